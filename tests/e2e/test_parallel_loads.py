"""End to end: a model whose load takes long (its ``load()`` waits for a file the test creates)
delays no other model: while it loads, another model's new version is picked up by the poll loop
and goes AVAILABLE, and an admin load of that other model answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import requests

from tests.conftest import ServerProcess
from tests.models import write_onnx_affine, write_python_model

ADMIN = "parallel-admin"

ECHO = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": inputs["x"]}
"""


def gated(started: Path, gate: Path) -> str:
    """A model body whose ``load()`` announces itself in ``started`` and returns once ``gate`` exists."""
    return f"""
def load(self):
    import pathlib, time
    pathlib.Path({str(started)!r}).touch()
    while not pathlib.Path({str(gate)!r}).exists():
        time.sleep(0.05)

def predict(self, inputs):
    return {{"y": inputs["x"]}}
"""


def _fast_answer(server: ServerProcess) -> float:
    response = requests.post(
        f"{server.url}/v1/models/fast:predict", json={"instances": [[1.0, 1.0, 1.0, 1.0]]}, timeout=10
    )
    assert response.status_code == 200, response.text
    return float(response.json()["predictions"][0][0])


def test_a_slow_load_delays_no_other_model(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = tmp_path / "repo"
    started, gate = tmp_path / "slow-load-started", tmp_path / "slow-load-gate"
    write_python_model(repo / "slow" / "1", ECHO)
    write_onnx_affine(repo / "fast" / "1", scale=1.0)
    server = start_server(str(repo), f"--admin_token={ADMIN}")
    server.wait_for(lambda: server.status("slow") == server.status("fast") == {"1": "AVAILABLE"}, "models")

    try:
        write_python_model(repo / "slow" / "2", gated(started, gate))
        server.wait_for(started.exists, "the slow load to start")

        write_onnx_affine(repo / "fast" / "2", scale=2.0)
        server.wait_for(lambda: server.status("fast").get("2") == "AVAILABLE", "fast version 2, polled")
        assert _fast_answer(server) == 2.0
        assert server.status("slow") == {"2": "LOADING", "1": "AVAILABLE"}  # still held by its gate

        write_onnx_affine(repo / "fast" / "3", scale=3.0)  # loaded now by the admin call, not a poll
        answer = requests.post(
            f"{server.url}/v2/repository/models/fast/load",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=20,
        )
        assert answer.status_code == 200, answer.text
        assert _fast_answer(server) == 3.0
        assert server.status("slow")["2"] == "LOADING"
        assert not gate.exists()
    finally:
        gate.touch()
    server.wait_for(lambda: server.status("slow") == {"2": "AVAILABLE", "1": "END"}, "slow version 2")
