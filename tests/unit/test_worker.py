"""Worker processes (``isolation = "process"``): tensors, errors, concurrency, death and close."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.runtimes import load_model
from inferd.runtimes.worker import WorkerDied, WorkerModel
from tests.models import write_python_model

SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32"}, {"name": "s", "dtype": "string"}], '
    '"outputs": [{"name": "x", "dtype": "float32"}, {"name": "s", "dtype": "string"}, '
    '{"name": "pid", "dtype": "int64"}]}'
)

ECHO = """
thread_safe = True

def load(self):
    pass

def predict(self, inputs):
    import os
    x = inputs["x"]
    if x.size and x.flat[0] == -1:
        raise ValueError("minus one is not a valid input")
    if x.size and x.flat[0] == -2:
        raise RuntimeError("the model broke")
    return {"x": x + 1, "s": inputs["s"], "pid": np.array([os.getpid()])}
"""

IN_WORKER = ModelSettings(isolation="process", warmup=False)


@pytest.fixture
def model(tmp_path: Path) -> Iterator[WorkerModel]:
    write_python_model(tmp_path / "1", ECHO, SIGNATURE)
    loaded, runtime = load_model(tmp_path / "1", IN_WORKER, None)
    assert runtime == "python"
    assert isinstance(loaded, WorkerModel)
    yield loaded
    loaded.close()


def call(model: WorkerModel, x: np.ndarray, s: object = ("a",)) -> dict[str, np.ndarray]:
    return dict(model.predict("serving_default", {"x": x, "s": np.array(s, dtype=object)}))


def test_tensors_cross_the_process_boundary_intact(model: WorkerModel) -> None:
    assert model.signatures["serving_default"].inputs[0].name == "x"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = call(model, x[:, ::2], ["é", b"\x00bytes"])  # a non-contiguous view, text and bytes
    np.testing.assert_array_equal(out["x"], x[:, ::2] + 1)
    assert out["s"].tolist() == ["é", b"\x00bytes"]
    assert out["x"].flags.writeable
    assert int(out["pid"][0]) == model.pid != os.getpid()
    empty = call(model, np.zeros((0, 4), np.float32), [])
    assert empty["x"].shape == (0, 4)
    big = np.random.default_rng(0).random((1000, 1000), dtype=np.float32)  # 4 MB
    np.testing.assert_array_equal(call(model, big)["x"], big + 1)


def test_errors_keep_their_kind(model: WorkerModel) -> None:
    with pytest.raises(InvalidArgument, match="minus one is not a valid input"):
        call(model, np.array([-1.0], np.float32))
    with pytest.raises(RuntimeError, match="RuntimeError: the model broke"):
        call(model, np.array([-2.0], np.float32))
    assert call(model, np.array([1.0], np.float32))["x"].tolist() == [2.0]


def test_concurrent_calls_each_get_their_own_answer(model: WorkerModel) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: call(model, np.full(3, i, np.float32))["x"], range(200)))
    assert [a.tolist() for a in answers] == [[i + 1.0] * 3 for i in range(200)]


def test_a_dead_worker_fails_every_call_and_reports_once(model: WorkerModel) -> None:
    reasons: list[str] = []
    reported = threading.Event()

    def on_exit(reason: str) -> None:
        reasons.append(reason)
        reported.set()

    model.supervise("echo:1", on_exit)
    os.kill(model.pid, signal.SIGKILL)
    with pytest.raises(WorkerDied, match=r"model echo:1: its worker process \d+ died, killed by SIGKILL"):
        call(model, np.array([1.0], np.float32))
    with pytest.raises(WorkerDied):
        call(model, np.array([1.0], np.float32))
    assert reported.wait(30)  # told from the reader thread, just after the calls failed
    assert len(reasons) == 1
    assert "SIGKILL" in reasons[0]
    late: list[str] = []
    model.supervise("echo:1", late.append)  # supervised after the death: told at once
    assert late == reasons


def test_close_stops_and_reaps_the_worker(tmp_path: Path) -> None:
    write_python_model(tmp_path / "1", ECHO, SIGNATURE)
    model, _ = load_model(tmp_path / "1", IN_WORKER, None)
    assert isinstance(model, WorkerModel)
    pid = model.pid
    reasons: list[str] = []
    model.supervise("echo:1", reasons.append)
    model.close()
    assert not Path(f"/proc/{pid}").exists()
    assert reasons == []  # a requested stop is no death
    with pytest.raises(WorkerDied, match="unloaded"):
        call(model, np.array([1.0], np.float32))


@pytest.mark.parametrize(
    ("load_body", "message"),
    [
        ("raise OSError('weights.bin is missing')", "OSError: weights.bin is missing"),
        ("import os; os._exit(7)", "died: exited with status 7"),
    ],
)
def test_load_failures_in_the_worker_are_load_errors(tmp_path: Path, load_body: str, message: str) -> None:
    write_python_model(
        tmp_path / "1", f"def load(self):\n    {load_body}\n\ndef predict(self, inputs):\n    return inputs"
    )
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path / "1", IN_WORKER, None)
