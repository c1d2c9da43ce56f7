"""Guarded canary rollouts with ``inferd rollout`` against a real server under continuous traffic:
a canary that breaches its error guard is rolled back in its first step and the label never
moves; a healthy one ends with the label on it and no failed request; a restarted server rolls a
running rollout back, as its state file says."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.conftest import ServerProcess, launch
from tests.e2e.test_shadow import SIGNATURE
from tests.models import write_onnx_affine, write_python_model

TOKEN = "rollout-secret"
ROW = [1.0, 2.0, 3.0, 4.0]
RAISES = """
def load(self):
    pass

def predict(self, inputs):
    if inputs["x"].any():  # warm-up sends zeros
        raise RuntimeError("the canary is broken")
    return {"y": inputs["x"]}
"""


def repository(base: Path, canary: Callable[[Path], None]) -> None:
    write_onnx_affine(base / "1", scale=1.0)
    canary(base / "2")
    (base / "inferd.toml").write_text(
        "version_policy = { all = true }\n[labels]\nstable = 1\n[traffic]\nstable = 100\n"
    )


@contextmanager
def traffic(server: ServerProcess) -> Iterator[Counter[tuple[int, str]]]:
    """Requests without a version, one after another until the block ends: (status, version)."""
    seen: Counter[tuple[int, str]] = Counter()
    stop = threading.Event()

    def run() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                answer = session.post(
                    f"{server.url}/v1/models/m:predict", json={"instances": [ROW]}, timeout=10
                )
                seen[(answer.status_code, answer.headers.get("x-inferd-model-version", ""))] += 1

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def rollout(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "inferd",
        "rollout",
        "m",
        f"--url={server.url}",
        f"--admin_token={TOKEN}",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def status(server: ServerProcess) -> dict[str, object]:
    answer = requests.post(
        f"{server.url}/v2/repository/models/m/rollout/status",
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    document: dict[str, object] = answer.json()
    return document


def labelled(server: ServerProcess) -> str:
    answer = requests.post(
        f"{server.url}/v1/models/m/labels/stable:predict", json={"instances": [ROW]}, timeout=5
    )
    assert answer.status_code == 200, answer.text
    return answer.headers["x-inferd-model-version"]


def test_a_canary_that_breaches_its_error_guard_is_rolled_back_in_one_step_and_the_label_stays(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    repository(base, lambda folder: write_python_model(folder, RAISES, SIGNATURE))
    server = start_server(f"--model_base_path={base}", "--model_name=m", f"--admin_token={TOKEN}")
    with traffic(server) as seen:
        done = rollout(server, "--to=2", "--steps=20,50,100", "--step_s=1", "--guard=error_rate<=0.01")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rolled_back" in done.stdout
    state = status(server)
    assert state["state"] == "rolled_back"
    events = state["history"]
    assert isinstance(events, list)
    assert [e["event"] for e in events] == ["started", "step", "rolled back"]
    assert events[-1]["step"] == 0
    assert "error_rate<=0.01" in events[-1]["failed"][0]
    assert labelled(server) == "1"
    assert seen[(500, "")] > 0  # the canary did fail some requests: the guard saw real errors
    # After the rollback, every request goes to the baseline again.
    for _ in range(20):
        answer = requests.post(f"{server.url}/v1/models/m:predict", json={"instances": [ROW]}, timeout=5)
        assert answer.headers["x-inferd-model-version"] == "1"
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    assert (
        'inferd_rollout_canary_percent{baseline="1",canary="2",model="m",state="rolled_back"} 0.0' in metrics
    )


def test_a_full_rollout_under_continuous_traffic_fails_no_request_and_moves_the_label(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    repository(base, lambda folder: write_onnx_affine(folder, scale=2.0))
    server = start_server(f"--model_base_path={base}", "--model_name=m", f"--admin_token={TOKEN}")
    with traffic(server) as seen:
        done = rollout(
            server,
            "--to=2",
            "--steps=10,50,100",
            "--step_s=0.5",
            "--guard=error_rate<=0.01",
            "--guard=p99_ms<=50*baseline",
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert {status for status, _ in seen} == {200}, seen
    assert {version for _, version in seen} == {"1", "2"}
    state = status(server)
    assert state["state"] == "done"
    assert [e["event"] for e in state["history"]] == [
        "started",
        "step",
        "step",
        "step",
        "moving the label",
        "done",
    ]  # type: ignore[union-attr]
    assert labelled(server) == "2"
    answer = requests.post(f"{server.url}/v1/models/m:predict", json={"instances": [ROW]}, timeout=5)
    assert answer.headers["x-inferd-model-version"] == "2"


def test_a_restarted_server_rolls_a_running_rollout_back(tmp_path: Path) -> None:
    base = tmp_path / "m"
    repository(base, lambda folder: write_onnx_affine(folder, scale=2.0))
    state_dir = tmp_path / "rollouts"
    args = (
        f"--model_base_path={base}",
        "--model_name=m",
        f"--admin_token={TOKEN}",
        f"--rollout_state_dir={state_dir}",
    )
    server = launch(tmp_path, *args)
    try:
        done = rollout(server, "--to=2", "--steps=50,100", "--step_s=600", "--no_wait")
        assert done.returncode == 0, done.stderr
        assert status(server)["state"] == "running"
    finally:
        server.stop()
    server = launch(tmp_path, *args)
    try:
        state = status(server)
        assert state["state"] == "rolled_back"
        assert [e["event"] for e in state["history"]][-1] == "rolled back at restart"  # type: ignore[union-attr]
        for _ in range(20):
            answer = requests.post(f"{server.url}/v1/models/m:predict", json={"instances": [ROW]}, timeout=5)
            assert answer.headers["x-inferd-model-version"] == "1"
        assert labelled(server) == "1"
    finally:
        server.stop()


def versions_answering(server: ServerProcess, n: int = 40) -> set[str]:
    seen = set()
    for _ in range(n):
        answer = requests.post(f"{server.url}/v1/models/m:predict", json={"instances": [ROW]}, timeout=5)
        assert answer.status_code == 200, answer.text
        seen.add(answer.headers["x-inferd-model-version"])
    return seen


def test_an_operator_pauses_resumes_aborts_and_promotes_a_rollout(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    repository(base, lambda folder: write_onnx_affine(folder, scale=2.0))
    server = start_server(f"--model_base_path={base}", "--model_name=m", f"--admin_token={TOKEN}")
    assert rollout(server, "--pause").returncode == 2  # no rollout yet: refused, named
    started = rollout(server, "--to=2", "--steps=50,100", "--step_s=600", "--no_wait")
    assert started.returncode == 0, started.stderr
    paused = rollout(server, "--pause")
    assert paused.returncode == 0, paused.stderr
    assert "paused (step 0)" in paused.stdout
    assert "to version 2: paused (step 0)" in rollout(server, "--status").stdout
    state = status(server)
    assert (state["state"], state["weights"]) == ("paused", {"2": 50.0, "1": 50.0})
    assert versions_answering(server) == {"1", "2"}  # the split holds while paused
    refused = rollout(server, "--pause")
    assert refused.returncode == 2  # refused, which a rolled-back rollout's 1 would not say
    assert "is paused; pause needs one that is running" in refused.stderr
    assert rollout(server, "--resume").returncode == 0
    assert status(server)["state"] == "running"
    assert rollout(server, "--abort").returncode == 0
    state = status(server)
    assert state["state"] == "rolled_back"
    assert state["history"][-1]["failed"] == ["aborted by an operator"]  # type: ignore[index]
    assert versions_answering(server) == {"1"}
    assert labelled(server) == "1"
    # A new rollout, promoted at once from its first step: the label moves, all traffic follows.
    assert rollout(server, "--to=2", "--steps=10,100", "--step_s=600", "--no_wait").returncode == 0
    promoted = rollout(server, "--promote")
    assert promoted.returncode == 0, promoted.stderr
    state = status(server)
    assert state["state"] == "done"
    assert [e["event"] for e in state["history"]][-3:] == ["promoted", "moving the label", "done"]  # type: ignore[union-attr]
    assert labelled(server) == "2"
    assert versions_answering(server) == {"2"}
