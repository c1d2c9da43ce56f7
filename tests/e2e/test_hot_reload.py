"""Versions appear, fail, and disappear under traffic: zero failed requests, old versions unloaded."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import requests

from tests.conftest import ServerProcess
from tests.models import write_onnx_affine

ONES = {"instances": [[1.0, 1.0, 1.0, 1.0]]}


class Traffic:
    """A client thread posting the same request until stopped; records every answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[int, float | str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    r = session.post(self.url, json=ONES, timeout=10)
                    value = r.json()["predictions"][0][0] if r.status_code == 200 else r.text
                    self.answers.append((r.status_code, value))
                except requests.RequestException as exc:
                    self.answers.append((0, repr(exc)))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=20)

    def latest(self) -> float | str | None:
        return self.answers[-1][1] if self.answers else None

    def failures(self) -> list[tuple[int, float | str]]:
        return [a for a in self.answers if a[0] != 200]


def test_new_version_takes_over_and_rollback_restores_the_old_one_with_no_failed_request(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "models" / "affine"
    write_onnx_affine(base / "1", scale=1.0)
    server = start_server("--model_name=affine", f"--model_base_path={base}")
    server.wait_for(lambda: server.status("affine") == {"1": "AVAILABLE"}, "version 1")

    with Traffic(f"{server.url}/v1/models/affine:predict") as traffic:
        server.wait_for(lambda: traffic.latest() == 1.0, "answers from version 1")
        staging = tmp_path / "staging"
        write_onnx_affine(staging, scale=2.0)
        staging.rename(base / "2")  # atomic, as TF Serving recommends
        server.wait_for(lambda: traffic.latest() == 2.0, "answers from version 2")
        server.wait_for(
            lambda: server.status("affine") == {"2": "AVAILABLE", "1": "END"}, "version 1 unloaded"
        )

        shutil.rmtree(base / "2")  # rollback
        server.wait_for(lambda: traffic.latest() == 1.0, "answers from version 1 again")
        server.wait_for(
            lambda: server.status("affine") == {"2": "END", "1": "AVAILABLE"}, "version 2 unloaded"
        )

    values = [value for _, value in traffic.answers]
    assert traffic.failures() == []
    assert len(values) > 20
    assert set(values) == {1.0, 2.0}
    # Each switch happens once: 1s, then 2s, then 1s again.
    switches = [i for i in range(1, len(values)) if values[i] != values[i - 1]]
    assert len(switches) == 2


def test_corrupt_version_never_replaces_the_serving_one_and_is_retried_when_fixed(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "affine"
    write_onnx_affine(base / "2", scale=2.0)
    server = start_server("--model_name=affine", f"--model_base_path={base}")
    server.wait_for(lambda: server.status("affine") == {"2": "AVAILABLE"}, "version 2")

    with Traffic(f"{server.url}/v1/models/affine:predict") as traffic:
        (base / "3").mkdir()
        (base / "3" / "model.onnx").write_bytes(b"\x00 this is not an onnx file")
        server.wait_for(lambda: server.status("affine").get("3") == "END", "version 3 to fail")
        status = requests.get(f"{server.url}/v1/models/affine/versions/3", timeout=5).json()
        (entry,) = status["model_version_status"]
        assert entry["status"]["error_code"] != "OK"
        assert "model.onnx" in entry["status"]["error_message"]
        assert server.status("affine")["2"] == "AVAILABLE"
        server.wait_for(lambda: len(traffic.answers) > 10, "traffic while version 3 is broken")
        assert {value for _, value in traffic.answers} == {2.0}

        write_onnx_affine(base / "3", scale=3.0)  # fixed in place: its files changed, so it is retried
        server.wait_for(lambda: traffic.latest() == 3.0, "answers from the fixed version 3")
        server.wait_for(
            lambda: server.status("affine") == {"3": "AVAILABLE", "2": "END"}, "version 2 unloaded"
        )
    assert traffic.failures() == []


def test_model_config_file_policies_labels_and_reload(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    for version in (1, 2, 3):
        write_onnx_affine(base / str(version), scale=float(version))
    other = tmp_path / "other"
    write_onnx_affine(other / "7", scale=7.0)
    config = tmp_path / "models.config"

    def write_config(*entries: str) -> None:
        config.write_text("model_config_list {\n" + "\n".join(entries) + "\n}\n")

    def predict(path: str) -> tuple[int, object]:
        r = requests.post(f"{server.url}/v1/models/{path}:predict", json=ONES, timeout=5)
        return r.status_code, r.json()["predictions"][0][0] if r.status_code == 200 else r.json()["error"]

    write_config(
        f'config {{ name: "m" base_path: "{base}" model_platform: "onnx" '
        "model_version_policy { specific { versions: 1 versions: 3 } } "
        'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 3 } }'
    )
    server = start_server(f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0.2")
    server.wait_for(lambda: server.status("m") == {"3": "AVAILABLE", "1": "AVAILABLE"}, "versions 1 and 3")
    assert predict("m") == (200, 3.0)
    assert predict("m/versions/1") == (200, 1.0)
    assert predict("m/versions/2")[0] == 404
    assert predict("m/labels/stable") == (200, 1.0)
    assert predict("m/labels/canary") == (200, 3.0)
    assert predict("m/labels/beta")[0] == 404

    write_config(
        f'config {{ name: "m" base_path: "{base}" model_version_policy {{ latest {{ num_versions: 2 }} }} }}',
        f'config {{ name: "other" base_path: "{other}" }}',
    )
    server.wait_for(lambda: server.status("other") == {"7": "AVAILABLE"}, "the added model")
    server.wait_for(
        lambda: server.status("m") == {"3": "AVAILABLE", "2": "AVAILABLE", "1": "END"}, "latest 2"
    )
    assert predict("other") == (200, 7.0)

    write_config(f'config {{ name: "m" base_path: "{base}" model_version_policy {{ all {{}} }} }}')
    server.wait_for(lambda: server.status("other") == {}, "the removed model")
    server.wait_for(
        lambda: set(server.status("m").values()) == {"AVAILABLE"} and len(server.status("m")) == 3, "all"
    )
    assert predict("other")[0] == 404

    config.write_text("model_config_list { config { name: 'm' base_path: ")  # broken: the old config stays
    server.wait_for(
        lambda: "keeping the previous model config" in server.log(), "the parse error to be logged"
    )
    assert predict("m/versions/2") == (200, 2.0)
    assert server.process.poll() is None


def test_repository_mode_picks_up_new_models_and_follows_inferd_toml(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = tmp_path / "repo"
    for version in (1, 2):
        write_onnx_affine(repo / "a" / str(version), scale=float(version))
    (repo / "a" / "inferd.toml").write_text("version_policy = { all = true }\n[labels]\nold = 1\n")
    (repo / ".hidden").mkdir()
    server = start_server(str(repo))
    server.wait_for(lambda: server.status("a") == {"2": "AVAILABLE", "1": "AVAILABLE"}, "both versions of a")
    r = requests.post(f"{server.url}/v1/models/a/labels/old:predict", json=ONES, timeout=5)
    assert r.json()["predictions"] == [[1.0] * 4]
    assert server.status(".hidden") == {}

    write_onnx_affine(repo / "b" / "1", scale=5.0)
    server.wait_for(lambda: server.status("b") == {"1": "AVAILABLE"}, "the new model b")
    r = requests.post(f"{server.url}/v1/models/b:predict", json=ONES, timeout=5)
    assert r.json()["predictions"] == [[5.0] * 4]


def test_a_version_still_being_written_waits_until_its_content_is_stable(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "affine"
    write_onnx_affine(base / "1", scale=1.0)
    server = start_server(
        "--model_name=affine", f"--model_base_path={base}", "--file_system_poll_wait_seconds=0.5"
    )
    server.wait_for(lambda: server.status("affine") == {"1": "AVAILABLE"}, "version 1")

    growing = base / "2" / "weights.bin"
    growing.parent.mkdir()
    stop = threading.Event()
    seen: list[dict[str, str]] = []

    def keep_writing() -> None:
        with growing.open("ab") as f:
            while not stop.wait(0.05):
                f.write(b"x")
                f.flush()

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        for _ in range(30):  # 30 status reads over several poll periods while the folder keeps changing
            seen.append(server.status("affine"))
            server.wait_for(lambda: growing.stat().st_size > len(seen), "the writer to make progress")
    finally:
        stop.set()
        writer.join()
    assert all("2" not in status for status in seen)  # never even tried: its content was never stable
    write_onnx_affine(base / "2", scale=2.0)
    server.wait_for(
        lambda: server.status("affine") == {"2": "AVAILABLE", "1": "END"}, "version 2 once stable"
    )


def test_sigterm_stops_the_server_cleanly(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    write_onnx_affine(tmp_path / "m" / "1", scale=1.0)
    server = start_server("--model_name=m", f"--model_base_path={tmp_path / 'm'}")
    server.wait_for(lambda: server.status("m") == {"1": "AVAILABLE"}, "version 1")
    assert server.stop() == 0
    assert "m:1 unloaded" in server.log()
