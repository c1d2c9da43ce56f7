"""Graceful shutdown against a real server under traffic: on SIGTERM readiness goes false at once,
new requests get 503 / UNAVAILABLE, every request in flight is answered, then the process exits 0;
past ``--drain_timeout_s`` it exits anyway."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess, launch
from tests.e2e.test_batching import slow_model, write_model
from tests.models import write_python_model

BATCH_S = 0.4
"""Seconds one batch of the slow model takes: long enough that requests are in flight at the signal."""

MARGIN_S = 0.3
"""A request sent this long before the signal has surely reached the server by then."""


@dataclass(frozen=True, slots=True)
class Outcome:
    sent: float
    answered: float
    kind: str
    """ok (right answer), refused (503 + Retry-After / UNAVAILABLE), closed (no connection), or
    what else came back."""


@dataclass
class Traffic:
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def record(self, sent: float, kind: str) -> None:
        self.outcomes.append(Outcome(sent, time.monotonic(), kind))
        if kind != "ok":
            time.sleep(0.05)  # no hammering once the server refuses


def rest_client(server: ServerProcess, traffic: Traffic, value: float) -> None:
    with requests.Session() as session:
        while not traffic.stop.is_set():
            sent = time.monotonic()
            try:
                r = session.post(
                    f"{server.url}/v1/models/slow:predict", json={"instances": [[value, value]]}, timeout=60
                )
            except requests.ConnectionError:
                traffic.record(sent, "closed")
                continue
            if r.status_code == 200:
                ok = r.json()["predictions"][0]["y"] == [2 * value, 2 * value]
                traffic.record(sent, "ok" if ok else f"wrong answer {r.text}")
            elif r.status_code == 503 and r.headers.get("retry-after") == "1":
                traffic.record(sent, "refused")
            else:
                traffic.record(sent, f"{r.status_code} {r.text}")


def grpc_client(server: ServerProcess, traffic: Traffic, value: float) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_target)
    x = grpcclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.full((1, 2), value, dtype=np.float32))
    while not traffic.stop.is_set():
        sent = time.monotonic()
        try:
            result = client.infer("slow", [x], client_timeout=60)
        except InferenceServerException as exc:
            status = exc.status() or ""
            # CANCELLED: the call reached the gRPC server as it stopped, after the drain (a call
            # sent before the signal must still end "ok")
            kind = {
                "StatusCode.UNAVAILABLE": "closed" if "connect" in str(exc) else "refused",
                "StatusCode.CANCELLED": "closed",
            }.get(status)
            traffic.record(sent, kind or f"{status} {exc}")
            continue
        y = result.as_numpy("y")
        traffic.record(sent, "ok" if y is not None and y.tolist() == [[2 * value] * 2] else f"wrong {y}")
    client.close()


@contextmanager
def under_traffic(server: ServerProcess, rest: int, grpc_clients: int) -> Iterator[Traffic]:
    traffic = Traffic()
    threads = [
        threading.Thread(target=rest_client, args=(server, traffic, float(i)), daemon=True)
        for i in range(rest)
    ]
    threads += [
        threading.Thread(target=grpc_client, args=(server, traffic, float(100 + i)), daemon=True)
        for i in range(grpc_clients)
    ]
    for thread in threads:
        thread.start()
    try:
        yield traffic
    finally:
        traffic.stop.set()
        for thread in threads:
            thread.join(timeout=30)


def health(server: ServerProcess) -> int:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(
        tmp_path / "repo" / "slow",
        slow_model(BATCH_S),
        "max_batch_size = 4\nbatch_timeout_micros = 0\nnum_batch_threads = 1\nmax_enqueued_batches = 16",
    )
    return tmp_path / "repo"


def test_sigterm_under_traffic_drains_every_request_in_flight_and_exits_0(repo: Path) -> None:
    server = launch(repo, str(repo), "--drain_timeout_s=30")
    try:
        assert requests.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
        assert health(server) == health_pb2.HealthCheckResponse.SERVING
        with under_traffic(server, rest=6, grpc_clients=2) as traffic:
            server.wait_for(lambda: len(traffic.outcomes) >= 8, "answers before the signal")
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            # Readiness goes false at once (once the signal is handled), while the requests in
            # flight are still being computed.
            server.wait_for(
                lambda: requests.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 503,
                "readiness to go false",
                timeout_s=BATCH_S,
            )
            assert health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
            ready = requests.get(f"{server.url}/v2/health/ready", timeout=5)
            assert ready.json()["error"] == "the server is shutting down"  # not "not every model..."
            assert server.status("slow") == {"1": "UNLOADING"}
            refused = requests.post(
                f"{server.url}/v2/models/slow/infer",
                json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 1]}]},
                timeout=5,
            )
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "shutting down" in refused.json()["error"]
            probed = time.monotonic()
            assert server.process.wait(timeout=30) == 0
            exited = time.monotonic()
    finally:
        server.stop()
    before = [o for o in traffic.outcomes if o.sent < signalled - MARGIN_S]
    in_flight = [o for o in before if o.answered > signalled]
    assert [o.kind for o in before if o.kind != "ok"] == []  # zero requests in flight lost
    assert len(in_flight) >= 4, "the signal should come while requests are queued or computing"
    assert probed < max(o.answered for o in in_flight) <= exited  # not ready while still serving
    after = [o.kind for o in traffic.outcomes if o.sent > signalled]
    assert "refused" in after
    assert set(after) <= {"ok", "refused", "closed"}, after
    log = server.log()
    assert "Traceback" not in log
    assert "slow:1 unloaded" in log
    assert "shutting down: unloading model slow" in log  # not "no longer configured"


@pytest.mark.parametrize(("drain_timeout_s", "signals"), [(1, 1), (30, 2)], ids=["timeout", "second signal"])
def test_a_request_longer_than_the_drain_does_not_hold_the_exit(
    repo: Path, drain_timeout_s: int, signals: int
) -> None:
    write_model(repo / "slow", slow_model(20.0), "max_batch_size = 1")
    (repo / "slow" / "inferd.toml").write_text("warmup = false\n[batching]\nmax_batch_size = 1\n")
    server = launch(repo, str(repo), f"--drain_timeout_s={drain_timeout_s}")
    try:
        with under_traffic(server, rest=1, grpc_clients=0) as traffic:
            time.sleep(1.0)  # the request is being computed
            took_s = signal_and_time_the_exit(server, signals)
    finally:
        server.stop()
    assert took_s < 8.0
    if signals == 1:
        assert took_s >= drain_timeout_s  # it did wait for the request
    assert "drain ended with 1 request(s) still in flight" in server.log()
    assert all(o.kind in ("closed", "refused") for o in traffic.outcomes), traffic.outcomes


PREDICT = "def predict(self, inputs):\n    return {'y': inputs['x']}\n"
HANGING_LOAD = "def load(self):\n    import time\n    time.sleep(600)\n"
"""A model whose load never ends within a test: what a shutdown must not wait for."""


def signal_and_time_the_exit(server: ServerProcess, signals: int) -> float:
    """Send SIGTERM ``signals`` times, 0.5 s apart; the seconds from the first to the exit, which
    must be status 0 within 15 s."""
    signalled = time.monotonic()
    for _ in range(signals):
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    assert server.process.wait(timeout=15) == 0
    return time.monotonic() - signalled


@pytest.mark.parametrize(("drain_timeout_s", "signals"), [(2, 1), (30, 2)], ids=["timeout", "second signal"])
def test_a_load_in_progress_does_not_hold_the_exit(
    tmp_path: Path, drain_timeout_s: int, signals: int
) -> None:
    repo = tmp_path / "repo"
    write_python_model(repo / "m" / "1", "def load(self):\n    pass\n" + PREDICT)
    (repo / "m" / "inferd.toml").write_text("warmup = false\n")
    server = launch(tmp_path, str(repo), f"--drain_timeout_s={drain_timeout_s}", poll_s=0.2)
    try:
        server.wait_available("m")
        write_python_model(repo / "m" / "2", HANGING_LOAD + PREDICT)
        server.wait_for(lambda: server.status("m").get("2") == "LOADING", "version 2 to be loading")
        took_s = signal_and_time_the_exit(server, signals)
    finally:
        server.stop()
    assert took_s < 2 + 3  # the drain timeout (or the second signal), and the last steps' margins
    assert "exiting without it" in server.log()


def test_ctrl_c_while_the_first_models_load_ends_the_process_at_once(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_python_model(repo / "m" / "1", HANGING_LOAD + PREDICT)
    server = launch(tmp_path, str(repo), wait=False)
    try:
        server.wait_for(lambda: "loading m:1" in server.log(), "the load to begin")
        time.sleep(0.5)  # in the model's load()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=10) == 0
    finally:
        server.stop()
    assert "Traceback" not in server.log()
