"""Guarded rollouts under ``--workers 2``: started, moved and ended through any worker, the split
and the label held by every worker, the guards read over both workers' requests, and a rollout
that goes on when the worker running its steps is killed; and label moves through either worker,
the last of which wins in both."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ServerProcess, launch
from tests.e2e.test_metrics import samples
from tests.e2e.test_workers import per_worker, workers
from tests.models import write_onnx_affine, write_python_model

ADMIN = {"authorization": "Bearer admin-secret"}
ROW = [1.0, 1.0, 1.0, 1.0]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """Versions 1 (y = x) and 2 (y = 2x) of ``affine``, label ``stable`` -> 1, two workers."""
    write_onnx_affine(tmp_path / "affine" / "1", scale=1.0)
    write_onnx_affine(tmp_path / "affine" / "2", scale=2.0)
    (tmp_path / "affine" / "inferd.toml").write_text(
        "version_policy = { all = true }\n[labels]\nstable = 1\n"
    )
    process = launch(tmp_path, str(tmp_path), "--workers=2", "--admin_token=admin-secret")
    process.wait_for(lambda: samples(process)[("inferd_workers_scraped", frozenset())] == 2, "both workers")
    yield process
    process.stop()


def rollout(server: ServerProcess, action: str = "", body: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST a rollout route of ``affine`` on a new connection (either worker may answer)."""
    path = f"{server.url}/v2/repository/models/affine/rollout" + (f"/{action}" if action else "")
    answer = requests.post(path, json=body or {}, headers=ADMIN, timeout=60)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def by_worker(server: ServerProcess) -> dict[str, requests.Session]:
    """A kept-alive connection to each worker, by worker number: each found by the worker whose
    count in ``/metrics`` a predict of version 1 on it moved."""
    sessions: dict[str, requests.Session] = {}
    for _ in range(60):
        session = requests.Session()
        before = per_worker(server, "tfserving_rest")
        answer = session.post(f"{server.url}/v1/models/affine/versions/1:predict", json={"instances": [ROW]})
        assert answer.status_code == 200, answer.text
        after = per_worker(server, "tfserving_rest")
        moved = [w for w in after if after[w] > before.get(w, 0.0)]
        assert len(moved) == 1, (before, after)
        sessions.setdefault(moved[0], session)
        if len(sessions) == 2:
            return sessions
    raise AssertionError(f"new connections reached one worker only: {list(sessions)}")


def seen_by_every_worker(server: ServerProcess) -> list[dict[str, Any]]:
    """``affine``'s row of the dashboard's model list, as each worker answers it."""
    rows = []
    for session in by_worker(server).values():
        models = session.get(f"{server.url}/dashboard/api/models", timeout=10).json()
        rows.append(next(row for row in models if row["name"] == "affine"))
    return rows


def predict(server: ServerProcess, version: int | None = None, session: Any = requests) -> float:
    """One V1 predict (on a new connection unless ``session``); the scale of the version that
    answered."""
    where = f"/versions/{version}" if version else ""
    response = session.post(
        f"{server.url}/v1/models/affine{where}:predict", json={"instances": [ROW]}, timeout=10
    )
    assert response.status_code == 200, response.text
    return float(response.json()["predictions"][0][0])


def wait_for(
    server: ServerProcess, done: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0
) -> dict[str, Any]:
    """The rollout's status once ``done`` holds for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = rollout(server, "status")
        if done(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"the rollout is {status['state']} at step {status['step']}: {status['history']}")


def test_a_rollout_through_one_worker_moves_every_workers_split_and_label(server: ServerProcess) -> None:
    started = rollout(server, body={"to": 2, "steps": [50, 100], "step_s": 0.3, "min_requests": 30})
    assert started["weights"] == {"1": 50.0, "2": 50.0}
    # The start answered once every worker had applied it.
    rows = seen_by_every_worker(server)
    assert all(
        row["split"] == {"1": 50.0, "2": 50.0} and row["rollout"]["state"] == "running" for row in rows
    )

    # Each step needs 30 canary requests: 15 go to each worker, so a step that counted only the
    # requests of the worker running it would wait for ever.
    waiting = wait_for(server, lambda s: s["history"][-1]["event"] == "waiting for requests")
    assert waiting["history"][-1]["answered"] == 0
    sessions = by_worker(server)
    for session in sessions.values():
        assert {predict(server, 2, session) for _ in range(15)} == {2.0}
    wait_for(
        server, lambda s: s["history"][-1] == {**s["history"][-1], "event": "waiting for requests", "step": 1}
    )
    for session in sessions.values():
        assert {predict(server, 2, session) for _ in range(15)} == {2.0}
    done = wait_for(server, lambda s: s["state"] == "done")
    assert [e["step"] for e in done["history"] if e["event"] == "step"] == [0, 1]
    assert done["history"][-1] == {**done["history"][-1], "event": "done", "label": "stable", "version": 2}

    server.wait_for(  # each worker shows it done once it followed the worker that ended it
        lambda: all(
            (row["labels"], row["split"], row["rollout"]["state"]) == ({"stable": 2}, {}, "done")
            for row in seen_by_every_worker(server)
        ),
        "done in both workers",
    )
    assert {predict(server, session=session) for session in by_worker(server).values()} == {2.0}
    exposition = requests.get(f"{server.url}/metrics", timeout=10).text
    assert re.search(r'inferd_rollout_canary_percent\{[^}]*state="done"[^}]*\} 100\.0', exposition)


def test_pause_and_abort_through_either_worker_hold_in_both(server: ServerProcess) -> None:
    rollout(server, body={"to": 2, "steps": [30, 100], "step_s": 600})
    assert rollout(server, "pause")["state"] == "paused"
    rows = seen_by_every_worker(server)
    assert all(row["rollout"]["state"] == "paused" and row["split"] == {"1": 70.0, "2": 30.0} for row in rows)
    for session in by_worker(server).values():  # each worker splits the requests it answers
        assert {predict(server, session=session) for _ in range(40)} == {1.0, 2.0}
    refused = requests.post(
        f"{server.url}/v2/repository/models/affine/rollout/pause", headers=ADMIN, timeout=30
    )
    assert refused.status_code == 400
    assert "is paused; pause needs one that is running" in refused.text
    assert rollout(server, "resume")["state"] == "running"
    aborted = rollout(server, "abort")
    assert (aborted["state"], aborted["weights"]) == ("rolled_back", {"1": 100.0})
    assert aborted["history"][-1]["failed"] == ["aborted by an operator"]
    rows = seen_by_every_worker(server)
    assert all(row["rollout"]["state"] == "rolled_back" and row["labels"] == {"stable": 1} for row in rows)
    for session in by_worker(server).values():
        assert {predict(server, session=session) for _ in range(20)} == {1.0}


def driver(server: ServerProcess) -> int:
    """The pid of the worker that holds the rollouts' driver lock (from ``/proc/locks``)."""
    for pid in workers(server):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.endswith("/rollouts.driver"):
                inode = os.stat(target).st_ino
                for line in Path("/proc/locks").read_text().splitlines():
                    fields = line.split()
                    if fields[1] == "FLOCK" and fields[5].split(":")[2] == str(inode):
                        return int(fields[4])
    raise AssertionError("no worker holds the driver lock")


def test_a_rollout_goes_on_when_the_worker_running_its_steps_is_killed(server: ServerProcess) -> None:
    rollout(server, body={"to": 2, "steps": [50, 100], "step_s": 1.0, "min_requests": 1})
    wait_for(server, lambda s: any(e["event"] == "step" for e in s["history"]))
    victim = driver(server)
    os.kill(victim, signal.SIGKILL)
    server.wait_for(lambda: victim not in workers(server), "the killed worker to be reaped")
    server.wait_for(lambda: len(workers(server)) == 2, "its successor")
    server.wait_for(lambda: driver(server) != victim, "another worker to take the steps over")
    deadline = time.monotonic() + 30
    while rollout(server, "status")["state"] == "running" and time.monotonic() < deadline:
        predict(server, version=2)
        time.sleep(0.05)
    status = wait_for(server, lambda s: s["state"] == "done")
    assert [e["step"] for e in status["history"] if e["event"] == "step"][-1] == 1
    assert {predict(server) for _ in range(20)} == {2.0}


def test_a_restarted_server_reads_the_rollout_state_folder_back_once_for_all_workers(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_onnx_affine(repo / "affine" / "1", scale=1.0)
    write_onnx_affine(repo / "affine" / "2", scale=2.0)
    (repo / "affine" / "inferd.toml").write_text("version_policy = { all = true }\n[labels]\nstable = 1\n")
    flags = ("--workers=2", "--admin_token=admin-secret", f"--rollout_state_dir={tmp_path / 'rollouts'}")

    def serve() -> ServerProcess:
        process = launch(repo, str(repo), *flags)
        process.wait_for(
            lambda: samples(process)[("inferd_workers_scraped", frozenset())] == 2, "both workers"
        )
        return process

    server = serve()
    try:
        rollout(server, body={"to": 2, "steps": [40, 100], "step_s": 600, "on_restart": "resume"})
    finally:
        assert server.stop() == 0
    server = serve()
    try:
        rows = seen_by_every_worker(server)
        assert all(row["split"] == {"1": 60.0, "2": 40.0} for row in rows), rows
        history = [[e["event"] for e in row["rollout"]["history"]] for row in rows]
        assert history == [["started", "step", "resumed at restart", "step"]] * 2  # read back once
        assert rollout(server, "abort")["state"] == "rolled_back"
    finally:
        assert server.stop() == 0
    server = serve()
    try:
        rows = seen_by_every_worker(server)
        assert all(row["split"] == {"1": 100.0} and row["rollout"]["state"] == "rolled_back" for row in rows)
    finally:
        server.stop()


def test_a_label_moved_back_after_a_rollout_stays_moved_in_a_restarted_worker(server: ServerProcess) -> None:
    # The finished rollout's label move was applied by each worker itself: a worker restarted
    # later moved the label to the canary again, over the admin call that had moved it back.
    rollout(server, body={"to": 2, "steps": [100], "step_s": 0.2})
    wait_for(server, lambda s: s["state"] == "done")
    server.wait_for(
        lambda: all(row["labels"] == {"stable": 2} for row in seen_by_every_worker(server)), "the label"
    )
    moved = requests.post(
        f"{server.url}/dashboard/api/models/affine/labels/stable",
        json={"version": 1},
        headers=ADMIN,
        timeout=30,
    )
    assert moved.status_code == 200, moved.text
    victim = workers(server)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for(lambda: victim not in workers(server) and len(workers(server)) == 2, "its successor")
    server.wait_for(lambda: samples(server)[("inferd_workers_scraped", frozenset())] == 2, "both serving")
    for session in by_worker(server).values():
        answer = session.post(
            f"{server.url}/v1/models/affine/labels/stable:predict", json={"instances": [ROW]}, timeout=10
        )
        assert answer.json()["predictions"][0][0] == 1.0, answer.text


def test_the_last_label_move_wins_in_every_worker_whichever_took_it(server: ServerProcess) -> None:
    # A move pinned the label in the worker that took it: a later move through the other worker
    # reached the first only as a plan label, which the pin beat.
    sessions = list(by_worker(server).values())
    for session, version in [(sessions[0], 2), (sessions[1], 1), (sessions[1], 2), (sessions[0], 1)]:
        moved = session.post(
            f"{server.url}/dashboard/api/models/affine/labels/stable",
            json={"version": version},
            headers=ADMIN,
            timeout=30,
        )
        assert moved.status_code == 200, moved.text
        for each in sessions:
            answer = each.post(
                f"{server.url}/v1/models/affine/labels/stable:predict", json={"instances": [ROW]}, timeout=10
            )
            assert answer.json()["predictions"][0][0] == float(version), (version, answer.text)


def test_a_rollout_whose_label_waits_behind_an_admin_load_finishes_under_the_next_driver(
    tmp_path: Path,
) -> None:
    # It was "done" before its label moved: a rollout started meanwhile took the old baseline,
    # and when the worker running the steps died in that moment, the label never moved.
    write_onnx_affine(tmp_path / "affine" / "1", scale=1.0)
    write_onnx_affine(tmp_path / "affine" / "2", scale=2.0)
    (tmp_path / "affine" / "inferd.toml").write_text(
        "version_policy = { all = true }\n[labels]\nstable = 1\n"
    )
    slow_now = tmp_path / "slow-now"
    write_python_model(
        tmp_path / "slow" / "1",
        f"""
        def load(self):
            import os, time
            if os.path.exists({str(slow_now)!r}):
                time.sleep(4)

        def predict(self, inputs):
            return {{"y": inputs["x"]}}
        """,
    )
    server = launch(tmp_path, str(tmp_path), "--workers=2", "--admin_token=admin-secret")
    try:
        server.wait_for(lambda: samples(server)[("inferd_workers_scraped", frozenset())] == 2, "both workers")
        unloaded = requests.post(f"{server.url}/v2/repository/models/slow/unload", headers=ADMIN, timeout=60)
        assert unloaded.status_code == 200, unloaded.text
        slow_now.touch()

        def load() -> None:
            with contextlib.suppress(requests.ConnectionError):  # the worker taking it may be killed
                requests.post(f"{server.url}/v2/repository/models/slow/load", headers=ADMIN, timeout=60)

        loading = threading.Thread(target=load)
        loading.start()  # holds the admin state's lock for 4 s
        time.sleep(0.5)
        rollout(server, body={"to": 2, "steps": [100], "step_s": 0.2})
        finishing = wait_for(server, lambda s: s["history"][-1]["event"] == "moving the label")
        assert finishing["state"] == "running"
        for action, body in [("pause", {}), ("", {"to": 2})]:
            refused = requests.post(
                f"{server.url}/v2/repository/models/affine/rollout" + (f"/{action}" if action else ""),
                json=body,
                headers=ADMIN,
                timeout=30,
            )
            assert refused.status_code == 400, refused.text
            assert "finishing" in refused.text or "already running" in refused.text, refused.text
        victim = driver(server)
        os.kill(victim, signal.SIGKILL)
        slow_now.unlink()
        loading.join()
        server.wait_for(lambda: victim not in workers(server) and len(workers(server)) == 2, "its successor")
        done = wait_for(server, lambda s: s["state"] == "done", timeout_s=60)
        assert [e["event"] for e in done["history"]][-2:] == ["moving the label", "done"]
        server.wait_for(lambda: samples(server)[("inferd_workers_scraped", frozenset())] == 2, "both serving")
        for session in by_worker(server).values():
            answer = session.post(
                f"{server.url}/v1/models/affine/labels/stable:predict", json={"instances": [ROW]}, timeout=10
            )
            assert answer.json()["predictions"][0][0] == 2.0, answer.text
    finally:
        server.stop()
