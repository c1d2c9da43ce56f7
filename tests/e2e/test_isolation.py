"""Worker-process isolation against a real server: a custom model that segfaults, one that calls
``os._exit``, a worker killed while idle, models whose loading raises or crashes. The server
lives on, other models answer, the status says what happened, a load brings the model back,
and no worker process is left behind (no zombie, none after unload or shutdown)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess, launch
from tests.models import write_onnx_affine, write_python_model

ADMIN = {"authorization": "Bearer admin-secret"}

SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}, '
    '{"name": "pid", "dtype": "int64", "shape": [-1]}]}'
)

CRASHY = """
thread_safe = True

def load(self):
    pass

def predict(self, inputs):
    import ctypes, os, pathlib, time
    x = inputs["x"]
    if (x == 13).any():
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if (x == 42).any():
        os._exit(3)
    if (x == 7).any():
        pathlib.Path(MARKER).touch()
        time.sleep(120)
    return {"y": x * 2, "pid": np.full(len(x), os.getpid(), dtype=np.int64)}
"""


def write_crashy(version_dir: Path, marker: Path) -> None:
    write_python_model(version_dir, CRASHY.replace("MARKER", repr(str(marker))), SIGNATURE)
    (version_dir.parent / "inferd.toml").write_text('isolation = "process"\n')


def write_failing_load(version_dir: Path, load_body: str, isolation: str) -> None:
    write_python_model(
        version_dir, f"def load(self):\n    {load_body}\n\ndef predict(self, inputs):\n    return inputs"
    )
    (version_dir.parent / "inferd.toml").write_text(f'isolation = "{isolation}"\n')


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("isolation")
    write_crashy(repo / "crashy" / "1", repo / "sleeping")
    write_onnx_affine(repo / "steady" / "1", scale=3.0, width=2)
    write_failing_load(repo / "raises_in_process" / "1", "raise RuntimeError('no weights here')", "none")
    write_failing_load(repo / "raises_in_worker" / "1", "raise RuntimeError('no weights here')", "process")
    write_failing_load(repo / "crashes_on_load" / "1", "import os; os.abort()", "process")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    """Scans once at start: only an admin load brings a crashed model back."""
    process = launch(repo, str(repo), "--admin_token=admin-secret")
    yield process
    process.stop()


def children(pid: int) -> dict[int, str]:
    """Child process id -> its state letter (``Z`` for a zombie), read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid:
            found[int(entry.name)] = state
    return found


def predict(server: ServerProcess, model: str, value: float) -> requests.Response:
    return requests.post(
        f"{server.url}/v1/models/{model}:predict", json={"instances": [[value, value]]}, timeout=60
    )


def worker_pid(server: ServerProcess) -> int:
    answer = predict(server, "crashy", 1.0)
    assert answer.status_code == 200, answer.text
    prediction = answer.json()["predictions"][0]
    assert prediction["y"] == [2.0, 2.0]
    pid = int(prediction["pid"])
    assert pid in children(server.process.pid)
    return pid


def version_status(server: ServerProcess, model: str) -> dict[str, object]:
    response = requests.get(f"{server.url}/v1/models/{model}", timeout=5)
    assert response.status_code == 200, response.text
    (status,) = response.json()["model_version_status"]
    return dict(status)


def wait_until_out_of_service(server: ServerProcess, model: str, reason: str) -> None:
    server.wait_for(lambda: version_status(server, model)["state"] == "END", f"{model} to leave service")
    status = version_status(server, model)["status"]
    assert isinstance(status, dict)
    assert status["error_code"] == "INTERNAL"
    assert reason in status["error_message"]
    assert "worker process" in status["error_message"]


def assert_crash_is_reported(server: ServerProcess, model: str, reason: str) -> None:
    """Status (v1 and V2), the repository index and the log all say why the model is down."""
    wait_until_out_of_service(server, model, reason)
    assert requests.get(f"{server.url}/v2/models/{model}/ready", timeout=5).status_code != 200
    index = requests.post(f"{server.url}/v2/repository/index", json={}, headers=ADMIN, timeout=5).json()
    (row,) = [row for row in index if row["name"] == model]
    assert row["state"] == "UNAVAILABLE"
    assert reason in row["reason"]
    server.wait_for(lambda: reason in server.log(), "the crash in the log")


def assert_reaped(server: ServerProcess, pid: int) -> None:
    """The worker is gone and no child of the server is a zombie."""
    server.wait_for(lambda: pid not in children(server.process.pid), f"worker {pid} to be reaped")
    assert "Z" not in children(server.process.pid).values()
    assert not Path(f"/proc/{pid}").exists()


def load(server: ServerProcess, model: str) -> None:
    answer = requests.post(f"{server.url}/v2/repository/models/{model}/load", headers=ADMIN, timeout=60)
    assert answer.status_code == 200, answer.text


def test_a_segfault_fails_its_request_and_the_server_serves_on(server: ServerProcess) -> None:
    pid = worker_pid(server)
    answer = predict(server, "crashy", 13.0)
    assert answer.status_code == 500
    message = answer.json()["error"]
    assert "crashy" in message
    assert "worker process" in message
    assert "SIGSEGV" in message
    assert server.process.poll() is None
    steady = predict(server, "steady", 1.0)
    assert steady.status_code == 200
    assert steady.json() == {"predictions": [[3.0, 3.0]]}
    assert_crash_is_reported(server, "crashy", "SIGSEGV")
    assert "Fatal Python error: Segmentation fault" in server.log()  # the worker's stack, for debugging
    assert_reaped(server, pid)
    assert predict(server, "crashy", 1.0).status_code == 404  # out of service until reloaded
    load(server, "crashy")
    assert worker_pid(server) != pid


def test_os_exit_in_the_model_is_reported_and_reloadable(server: ServerProcess) -> None:
    pid = worker_pid(server)
    answer = predict(server, "crashy", 42.0)
    assert answer.status_code == 500
    assert "exited with status 3" in answer.json()["error"]
    assert_crash_is_reported(server, "crashy", "exited with status 3")
    assert_reaped(server, pid)
    assert predict(server, "steady", 1.0).status_code == 200
    load(server, "crashy")
    assert worker_pid(server) != pid


def test_grpc_clients_get_internal_naming_the_dead_worker(server: ServerProcess) -> None:
    """What Triton answers when its Python backend's stub process dies."""
    pid = worker_pid(server)
    client = grpcclient.InferenceServerClient(server.grpc_target)
    tensor = grpcclient.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.full((1, 2), 13.0, np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("crashy", [tensor])
    assert caught.value.status() == "StatusCode.INTERNAL"
    assert "crashy:1: its worker process" in str(caught.value.message())
    wait_until_out_of_service(server, "crashy", "SIGSEGV")
    assert not client.is_model_ready("crashy")
    assert_reaped(server, pid)
    load(server, "crashy")
    assert client.is_model_ready("crashy")


def test_requests_in_flight_fail_fast_when_the_worker_dies(server: ServerProcess, repo: Path) -> None:
    """A request stuck in a two-minute call answers as soon as another one crashes the worker."""
    worker_pid(server)
    marker = repo / "sleeping"
    marker.unlink(missing_ok=True)
    answers: list[tuple[requests.Response, float]] = []

    def slow() -> None:
        started = time.monotonic()
        answers.append((predict(server, "crashy", 7.0), time.monotonic() - started))

    thread = threading.Thread(target=slow)
    thread.start()
    server.wait_for(marker.exists, "the slow call to start in the worker")
    assert predict(server, "crashy", 13.0).status_code == 500
    thread.join(timeout=60)
    assert not thread.is_alive()
    ((answer, seconds),) = answers
    assert answer.status_code == 500
    assert "SIGSEGV" in answer.json()["error"]
    assert seconds < 60  # the call itself would have taken 120 s
    wait_until_out_of_service(server, "crashy", "SIGSEGV")
    load(server, "crashy")


def test_a_worker_killed_while_idle_shows_in_the_status(server: ServerProcess) -> None:
    pid = worker_pid(server)
    os.kill(pid, signal.SIGKILL)
    assert_crash_is_reported(server, "crashy", "SIGKILL")
    assert_reaped(server, pid)
    load(server, "crashy")
    assert worker_pid(server) != pid


def test_unload_stops_the_worker(server: ServerProcess) -> None:
    pid = worker_pid(server)
    answer = requests.post(f"{server.url}/v2/repository/models/crashy/unload", headers=ADMIN, timeout=30)
    assert answer.status_code == 200, answer.text
    assert_reaped(server, pid)
    load(server, "crashy")
    assert worker_pid(server) != pid


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("raises_in_process", "RuntimeError: no weights here"),
        ("raises_in_worker", "RuntimeError: no weights here"),
        ("crashes_on_load", "died: killed by SIGABRT"),
    ],
)
def test_a_model_that_fails_to_load_takes_nothing_down(
    server: ServerProcess, model: str, reason: str
) -> None:
    status = version_status(server, model)
    assert status["state"] == "END"
    assert isinstance(status["status"], dict)
    assert reason in status["status"]["error_message"]
    assert predict(server, "steady", 1.0).status_code == 200
    assert "Z" not in children(server.process.pid).values()


def test_the_next_scan_reloads_a_crashed_worker_and_shutdown_leaves_no_worker(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    write_crashy(tmp_path / "repo" / "crashy" / "1", tmp_path / "sleeping")
    server = start_server(str(tmp_path / "repo"))
    first = worker_pid(server)
    assert predict(server, "crashy", 42.0).status_code == 500
    server.wait_for(lambda: "exited with status 3" in server.log(), "the crash in the log")
    server.wait_for(lambda: server.log().count("crashy:1 is AVAILABLE") == 2, "the scan to reload it")
    second = worker_pid(server)
    assert second != first
    assert_reaped(server, first)
    assert server.stop() == 0
    assert not Path(f"/proc/{second}").exists()
