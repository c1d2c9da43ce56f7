"""Model lifecycle against a real server: hot reload and rollback under traffic, failed versions,
version policies and labels (model config file and inferd.toml), config reload, repository mode,
half-copied versions and shutdown."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess
from tests.models import write_onnx_affine, write_python_model

ONES = {"instances": [[1, 1, 1, 1]]}


class Client:
    """A thread posting ``ONES`` back to back until stopped; keeps (status, first output value)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[int, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    r = session.post(self.url, json=ONES, timeout=10)
                except requests.RequestException as exc:
                    self.answers.append((0, repr(exc)))
                    continue
                self.answers.append((r.status_code, r.json()["predictions"][0][0] if r.ok else r.text))

    def latest(self) -> object:
        return self.answers[-1][1] if self.answers else None

    def failures(self) -> list[tuple[int, object]]:
        return [a for a in self.answers if a[0] != 200]

    def values(self) -> list[object]:
        return [value for _, value in self.answers]


@contextmanager
def traffic(server: ServerProcess, model: str) -> Iterator[Client]:
    client = Client(f"{server.url}/v1/models/{model}:predict")
    client._thread.start()
    try:
        server.wait_for(lambda: len(client.answers) > 0, "a first answer")
        yield client
    finally:
        client._stop.set()
        client._thread.join(timeout=20)


def runs(values: list[object]) -> list[object]:
    """Consecutive duplicates collapsed: [1, 1, 2, 2, 1] -> [1, 2, 1]."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def predict(server: ServerProcess, path: str) -> tuple[int, object]:
    """POST ``ONES`` to ``/v1/models/{path}:predict``: (status, first value or error text)."""
    r = requests.post(f"{server.url}/v1/models/{path}:predict", json=ONES, timeout=10)
    return r.status_code, r.json()["predictions"][0][0] if r.ok else r.json()["error"]


def write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def write_versions(base: Path, *versions: int) -> None:
    for version in versions:
        write_onnx_affine(base / str(version), scale=float(version))


# 1. Hot reload and rollback under continuous traffic


@pytest.mark.parametrize("copy", ["rename", "copytree"])
def test_new_version_replaces_the_old_and_rollback_restores_it_without_a_failed_request(
    tmp_path: Path, start_server: Callable[..., ServerProcess], copy: str
) -> None:
    base = tmp_path / "models" / "m"
    write_onnx_affine(base / "1", scale=1.0)
    server = start_server("--model_name=m", f"--model_base_path={base}")
    assert server.status("m") == {"1": "AVAILABLE"}

    with traffic(server, "m") as client:
        assert client.latest() == 1.0
        staging = tmp_path / "staging" / "2"
        write_onnx_affine(staging, scale=2.0)
        if copy == "rename":
            os.rename(staging, base / "2")  # atomic, as TF Serving recommends
        else:
            shutil.copytree(staging, base / "2")  # file by file: the poller may see it half-done
        server.wait_for(lambda: client.latest() == 2.0, "answers from version 2")
        server.wait_for(lambda: server.status("m") == {"2": "AVAILABLE", "1": "END"}, "version 1 unloaded")
        switched = len(client.answers)

        shutil.rmtree(base / "2")  # rollback
        server.wait_for(lambda: client.latest() == 1.0, "answers from version 1 again")
        server.wait_for(lambda: server.status("m") == {"2": "END", "1": "AVAILABLE"}, "version 2 unloaded")
        count = len(client.answers)
        server.wait_for(lambda: len(client.answers) > count + 5, "more answers after the rollback")

    assert client.failures() == []
    assert runs(client.values()[:switched]) == [1.0, 2.0]
    assert runs(client.values()) == [1.0, 2.0, 1.0]  # each switch once, never back and forth


def test_writing_into_a_served_version_folder_keeps_it_serving(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A served version whose files change (a log, a re-copy) must not drop out of service."""
    base = tmp_path / "m"
    write_onnx_affine(base / "1", scale=1.0)
    server = start_server("--model_name=m", f"--model_base_path={base}")
    notes = base / "1" / "notes.txt"
    stop = threading.Event()
    written = [0]

    def keep_writing() -> None:
        while not stop.wait(0.05):
            written[0] += 1
            notes.write_text("x" * written[0])

    statuses: list[dict[str, str]] = []
    with traffic(server, "m") as client:
        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            for step in range(1, 31):  # 30 writes, 1.5 s at least: several scans see the folder change
                server.wait_for(lambda: written[0] >= step, "the writer to go on")  # noqa: B023
                statuses.append(server.status("m"))
        finally:
            stop.set()
            writer.join()
        count = len(client.answers)
        server.wait_for(lambda: len(client.answers) > count + 5, "answers after the writes")
    assert client.failures() == []
    assert set(client.values()) == {1.0}
    assert all(status == {"1": "AVAILABLE"} for status in statuses)
    assert server.log().count("loading m:1") == 1  # never unloaded and reloaded


# 2. A corrupt version


def test_a_corrupt_version_fails_keeps_the_old_one_serving_and_loads_once_fixed(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    write_onnx_affine(base / "2", scale=2.0)
    server = start_server("--model_name=m", f"--model_base_path={base}")

    with traffic(server, "m") as client:
        (base / "3").mkdir()
        (base / "3" / "model.onnx").write_bytes(b"\x08\x07 garbage, not a protobuf \xff\xfe" * 20)
        server.wait_for(lambda: server.status("m").get("3") == "END", "version 3 to fail")
        r = requests.get(f"{server.url}/v1/models/m/versions/3", timeout=5)
        (entry,) = r.json()["model_version_status"]
        assert entry["state"] == "END"
        assert entry["status"]["error_code"] not in ("OK", "", 0)
        message = entry["status"]["error_message"]
        assert "model.onnx" in message
        assert "Traceback" not in message
        assert server.status("m") == {"3": "END", "2": "AVAILABLE"}
        assert predict(server, "m/versions/3")[0] == 404
        assert predict(server, "m") == (200, 2.0)

        write_onnx_affine(base / "3", scale=3.0)  # fixed in place: its files changed, so it is retried
        server.wait_for(lambda: client.latest() == 3.0, "answers from the fixed version 3")
        server.wait_for(lambda: server.status("m") == {"3": "AVAILABLE", "2": "END"}, "version 2 unloaded")

    assert client.failures() == []
    assert runs(client.values()) == [2.0, 3.0]
    # Scans between the failure and the fix saw unchanged files: no retry in a loop.
    assert server.log().count("m:3 failed to load") == 1
    r = requests.get(f"{server.url}/v1/models/m/versions/3", timeout=5)
    assert r.json()["model_version_status"][0]["status"] == {"error_code": "OK", "error_message": ""}


def test_a_model_py_that_calls_sys_exit_fails_its_version_and_never_stops_the_server(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "p"
    predict_body = """
    def load(self):
        pass

    def predict(self, inputs):
        if (inputs["x"] > 5).any():
            raise SystemExit(4)
        return {"y": inputs["x"] * 2}
    """
    write_python_model(base / "1", predict_body)
    server = start_server("--model_name=p", f"--model_base_path={base}")
    url = f"{server.url}/v1/models/p:predict"
    ones, doubled = {"instances": [[1, 1]]}, {"predictions": [[2.0, 2.0]]}

    r = requests.post(url, json={"instances": [[9, 1]]}, timeout=10)
    assert r.status_code == 500
    assert "failed while predicting" in r.json()["error"]
    # The message names the request id the server logged the traceback under.
    request_id = r.json()["error"].split("predicting request ")[1].split(";")[0]
    assert f"failed on request {request_id}\n" in server.log()
    assert requests.post(url, json=ones, timeout=10).json() == doubled

    write_python_model(base / "2", predict_body.replace("pass", "raise SystemExit(3)"))
    server.wait_for(lambda: server.status("p").get("2") == "END", "version 2 to fail")
    r = requests.get(f"{server.url}/v1/models/p/versions/2", timeout=5)
    assert "SystemExit" in r.json()["model_version_status"][0]["status"]["error_message"]
    assert server.status("p") == {"2": "END", "1": "AVAILABLE"}
    assert requests.post(url, json=ones, timeout=10).json() == doubled
    assert server.process.poll() is None


def test_a_model_that_leaves_out_an_output_gets_a_500_naming_the_request_id(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "p"
    predict_body = """
    def load(self):
        pass

    def predict(self, inputs):
        if (inputs["x"] > 5).any():
            return {"z": inputs["x"]}
        return {"y": inputs["x"]}
    """
    write_python_model(base / "1", predict_body)
    server = start_server("--model_name=p", f"--model_base_path={base}")
    r = requests.post(f"{server.url}/v1/models/p:predict", json={"instances": [[9, 1]]}, timeout=10)
    assert r.status_code == 500
    request_id = r.json()["error"].split(" on request ")[1]
    assert r.json()["error"] == f"model p:1 did not return output(s) ['y'] on request {request_id}"
    assert f"p:1 returned outputs ['z'] on request {request_id}, missing ['y']" in server.log()


# 3. and 4. Version policies and labels


def config_entry(name: str, base: Path, extra: str = "") -> str:
    return f'config {{ name: "{name}" base_path: "{base}" {extra} }}'


def model_config(*entries: str) -> str:
    return "model_config_list {\n  " + "\n  ".join(entries) + "\n}\n"


def assert_serves_exactly(server: ServerProcess, model: str, versions: set[int]) -> None:
    """Exactly ``versions`` are AVAILABLE and answer by number (value == version); others 404;
    a request without a version goes to the highest."""
    status = server.status(model)
    assert {int(v) for v, state in status.items() if state == "AVAILABLE"} == versions, status
    for version in (1, 2, 3, 4):
        code, value = predict(server, f"{model}/versions/{version}")
        if version in versions:
            assert (code, value) == (200, float(version))
        else:
            assert code == 404, value
            assert f"Specific({model}, {version})" in str(value)
    assert predict(server, model) == (200, float(max(versions)))


POLICIES = {
    "default": ("", {3}),
    "latest2": ("model_version_policy { latest { num_versions: 2 } }", {2, 3}),
    "all": ("model_version_policy { all {} }", {1, 2, 3}),
    "specific": ("model_version_policy { specific { versions: 1 versions: 3 versions: 9 } }", {1, 3}),
}


def test_version_policies_from_the_model_config_file(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    config = tmp_path / "models.config"
    entries = []
    for name, (policy, _) in POLICIES.items():
        write_versions(tmp_path / name, 1, 2, 3)
        entries.append(config_entry(name, tmp_path / name, policy))
    config.write_text(model_config(*entries))
    server = start_server(f"--model_config_file={config}")
    for name, (_, versions) in POLICIES.items():
        server.wait_for(lambda: len(server.status(name)) == len(versions), f"{name} to load")  # noqa: B023
        assert_serves_exactly(server, name, versions)


def test_version_policies_from_inferd_toml_in_repository_mode(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = tmp_path / "repo"
    toml = {
        "default": ("", {3}),
        "latest2": ("version_policy = { latest = 2 }\n", {2, 3}),
        "all": ("version_policy = { all = true }\n", {1, 2, 3}),
        "specific": ("version_policy = { specific = [1, 3, 9] }\n", {1, 3}),
    }
    for name, (text, _) in toml.items():
        write_versions(repo / name, 1, 2, 3)
        (repo / name / "inferd.toml").write_text(text)
    server = start_server(str(repo))
    for name, (_, versions) in toml.items():
        server.wait_for(lambda: len(server.status(name)) == len(versions), f"{name} to load")  # noqa: B023
        assert_serves_exactly(server, name, versions)


def test_the_model_config_file_policy_wins_over_inferd_toml(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    write_versions(base, 1, 2, 3)
    (base / "inferd.toml").write_text("version_policy = { latest = 1 }\n[labels]\nignored = 3\n")
    config = tmp_path / "models.config"
    config.write_text(
        model_config(
            config_entry(
                "m", base, 'model_version_policy { all {} } version_labels { key: "stable" value: 1 }'
            )
        )
    )
    server = start_server(f"--model_config_file={config}")
    server.wait_for(lambda: len(server.status("m")) == 3, "every version")
    assert_serves_exactly(server, "m", {1, 2, 3})
    assert predict(server, "m/labels/stable") == (200, 1.0)
    assert predict(server, "m/labels/ignored")[0] == 400  # an unknown label: 400, as TF Serving


def test_labels_from_the_model_config_file(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    write_versions(base, 1, 2, 3)
    config = tmp_path / "models.config"
    labels = 'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 3 }'
    config.write_text(model_config(config_entry("m", base, f"model_version_policy {{ all {{}} }} {labels}")))
    server = start_server(f"--model_config_file={config}")
    server.wait_for(lambda: len(server.status("m")) == 3, "every version")

    assert predict(server, "m/labels/stable") == (200, 1.0)
    assert predict(server, "m/labels/canary") == (200, 3.0)
    assert predict(server, "m") == (200, 3.0)
    code, error = predict(server, "m/labels/beta")
    assert code == 400  # TF Serving's v1 answers an unknown label with INVALID_ARGUMENT
    assert "beta" in str(error)
    r = requests.get(f"{server.url}/v1/models/m/labels/stable/metadata", timeout=5)
    assert r.status_code == 200
    assert r.json()["model_spec"]["version"] == "1"
    assert requests.get(f"{server.url}/v1/models/m/labels/beta/metadata", timeout=5).status_code == 400


def test_labels_from_inferd_toml(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    repo = tmp_path / "repo"
    write_versions(repo / "m", 1, 2)
    (repo / "m" / "inferd.toml").write_text(
        "version_policy = { all = true }\n[labels]\nstable = 1\nnext_2 = 2\nmissing = 7\n"
    )
    server = start_server(str(repo))
    server.wait_for(lambda: len(server.status("m")) == 2, "both versions")
    assert predict(server, "m/labels/stable") == (200, 1.0)
    assert predict(server, "m/labels/next_2") == (200, 2.0)
    assert predict(server, "m/labels/unknown")[0] == 400
    code, error = predict(server, "m/labels/missing")  # names a version that is not loaded
    assert code == 404
    assert "version 7" in str(error)


# 5. Model config file reload


def test_model_config_file_reload_adds_removes_and_survives_a_broken_file(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_versions(tmp_path / "a", 1)
    write_onnx_affine(tmp_path / "b" / "1", scale=5.0)
    config = tmp_path / "models.config"
    only_a = model_config(config_entry("a", tmp_path / "a"))
    config.write_text(only_a)
    server = start_server(f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0.3")
    assert predict(server, "a") == (200, 1.0)
    assert predict(server, "b")[0] == 404

    write_atomically(
        config, model_config(config_entry("a", tmp_path / "a"), config_entry("b", tmp_path / "b"))
    )
    server.wait_for(lambda: server.status("b") == {"1": "AVAILABLE"}, "model b to be added")
    assert predict(server, "b") == (200, 5.0)
    assert predict(server, "a") == (200, 1.0)

    write_atomically(config, model_config(config_entry("b", tmp_path / "b")))
    server.wait_for(lambda: server.status("a") == {}, "model a to be removed")
    code, error = predict(server, "a")
    assert code == 404
    assert "Latest(a)" in str(error)
    assert predict(server, "b") == (200, 5.0)

    write_atomically(config, 'model_config_list { config { name: "a" base_path: ')  # does not parse
    server.wait_for(
        lambda: "keeping the previous model config" in server.log(), "the parse error to be logged"
    )
    assert server.process.poll() is None
    assert predict(server, "b") == (200, 5.0)
    assert predict(server, "a")[0] == 404

    write_atomically(config, only_a)  # a valid file is applied again after a broken one
    server.wait_for(lambda: server.status("a") == {"1": "AVAILABLE"}, "model a to come back")
    server.wait_for(lambda: server.status("b") == {}, "model b to be removed")
    assert predict(server, "a") == (200, 1.0)


def test_a_new_base_path_in_the_model_config_file_takes_over_without_a_failed_request(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_versions(tmp_path / "old", 1)
    write_versions(tmp_path / "new", 2)
    config = tmp_path / "models.config"
    config.write_text(model_config(config_entry("m", tmp_path / "old")))
    server = start_server(
        f"--model_config_file={config}",
        "--model_config_file_poll_wait_seconds=0.1",
        "--file_system_poll_wait_seconds=0.5",
    )
    with traffic(server, "m") as client:
        write_atomically(config, model_config(config_entry("m", tmp_path / "new")))
        server.wait_for(lambda: client.latest() == 2.0, "answers from the new base path")
    assert client.failures() == []
    assert runs(client.values()) == [1.0, 2.0]


# 6. Repository mode


def test_repository_mode_serves_a_model_folder_added_later(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = tmp_path / "repo"
    write_versions(repo / "a", 1)
    (repo / ".staging").mkdir()
    server = start_server(str(repo))
    assert predict(server, "a") == (200, 1.0)
    assert predict(server, "b")[0] == 404

    write_onnx_affine(repo / "b" / "1", scale=5.0)  # written in place, not renamed
    server.wait_for(lambda: server.status("b") == {"1": "AVAILABLE"}, "the new model b")
    assert predict(server, "b") == (200, 5.0)
    assert predict(server, "a") == (200, 1.0)
    assert server.status(".staging") == {}


# 7. A version still being copied


def test_a_version_still_being_copied_is_not_loaded_until_its_files_stop_changing(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    write_onnx_affine(base / "1", scale=1.0)
    server = start_server(
        "--model_name=m", f"--model_base_path={base}", "--file_system_poll_wait_seconds=0.3"
    )
    write_onnx_affine(tmp_path / "source", scale=2.0)
    content = (tmp_path / "source" / "model.onnx").read_bytes()

    # Version 2 gets a complete, valid model.onnx first, so that loading it too early would
    # succeed and show; a second file keeps growing, as a copy in progress does.
    (base / "2").mkdir()
    (base / "2" / "model.onnx").write_bytes(content)
    growing = base / "2" / "weights.bin"
    stop = threading.Event()
    written = [0]

    def copy_slowly() -> None:
        with growing.open("wb") as f:
            while not stop.wait(0.05):
                f.write(b"w" * 16)
                f.flush()
                written[0] += 1

    statuses: list[dict[str, str]] = []
    with traffic(server, "m") as client:
        writer = threading.Thread(target=copy_slowly)
        writer.start()
        try:
            for step in range(1, 31):  # 30 writes, 1.5 s at least: several scans see it change
                server.wait_for(lambda: written[0] >= step, "the copy to go on")  # noqa: B023
                statuses.append(server.status("m"))
        finally:
            stop.set()
            writer.join()
        assert all(status == {"1": "AVAILABLE"} for status in statuses), statuses
        assert set(client.values()) == {1.0}

        server.wait_for(lambda: client.latest() == 2.0, "version 2 once its files are stable")
        server.wait_for(lambda: server.status("m") == {"2": "AVAILABLE", "1": "END"}, "version 1 unloaded")
    assert client.failures() == []
    assert server.log().count("loading m:2") == 1


# 8. Shutdown


def test_sigterm_exits_with_status_0_after_unloading(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_versions(tmp_path / "m", 1)
    server = start_server("--model_name=m", f"--model_base_path={tmp_path / 'm'}")
    with traffic(server, "m") as client:
        server.wait_for(lambda: len(client.answers) > 5, "some answers")
        assert server.stop() == 0
    assert "m:1 unloaded" in server.log()
    assert "Traceback" not in server.log()
    assert set(client.values()[:5]) == {1.0}
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v1/models/m", timeout=2)
