"""Overload, deadlines and clients that go away, against a real server.

The open-loop load comes from ``inferd bench`` (``inferd.loadtest``) at five times the model's
capacity; a probe beside it times the refusals. The bound on accepted latency is the documented
one (docs/batching.md, "Load shedding"): (max_enqueued_batches / num_batch_threads + 1) batch
latencies plus the batch timeout, here 0.5 s; the test allows twice that plus 0.5 s, for a
loaded machine (an unbounded queue would reach seconds within the run).
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferd.loadtest import BenchOptions
from inferd.loadtest import run as bench
from inferd.usage import read_pid
from tests.conftest import ServerProcess, launch
from tests.e2e.test_batching import ROW_AWARE_SIGNATURE, metric, slow_model, write_model
from tests.models import write_python_model

BATCH_S = 0.1
BATCH_ROWS = 4
QUEUED_BATCHES = 4
CAPACITY = BATCH_ROWS / BATCH_S  # requests/s of one row
BOUND_S = (QUEUED_BATCHES + 1) * BATCH_S + 0.002
V2_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 1]}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("overload")
    write_model(
        repo / "work",
        slow_model(BATCH_S),
        f"max_batch_size = {BATCH_ROWS}\nbatch_timeout_micros = 2000\nnum_batch_threads = 1\n"
        f"max_enqueued_batches = {QUEUED_BATCHES}",
    )
    process = launch(repo, str(repo))
    process.wait_for(lambda: process.status("work") == {"1": "AVAILABLE"}, "the model")
    yield process
    process.stop()


def one_request_s(server: ServerProcess) -> float:
    started = time.monotonic()
    assert requests.post(f"{server.url}/v2/models/work/infer", json=V2_BODY, timeout=10).status_code == 200
    return time.monotonic() - started


def probe_refusals(server: ServerProcess, stop: threading.Event) -> list[tuple[int, float, str | None]]:
    """Send one request every 20 ms until ``stop``: (status, seconds, Retry-After) of each."""
    seen = []
    with requests.Session() as session:
        while not stop.is_set():
            started = time.monotonic()
            r = session.post(f"{server.url}/v2/models/work/infer", json=V2_BODY, timeout=10)
            seen.append((r.status_code, time.monotonic() - started, r.headers.get("retry-after")))
            time.sleep(0.02)
    return seen


@pytest.mark.parametrize(("protocol", "refusal"), [("v2", "503"), ("v2-grpc", "UNAVAILABLE")])
def test_five_times_capacity_keeps_accepted_latency_bounded_and_refuses_the_rest_fast(
    server: ServerProcess, protocol: str, refusal: str
) -> None:
    idle_s = min(one_request_s(server) for _ in range(3))
    url = server.grpc_target if protocol.endswith("grpc") else server.url
    options = BenchOptions(
        url, "work", protocol=protocol, rates=(5 * CAPACITY,), duration_s=4.0, warmup_s=1.0, timeout_s=10.0
    )
    _, rss_before = read_pid(server.process.pid)
    stop = threading.Event()
    with cf.ThreadPoolExecutor(2) as pool:
        load = pool.submit(bench, options)
        time.sleep(1.5)  # into the overload
        probes = pool.submit(probe_refusals, server, stop)
        peaks = []
        while not load.done():
            peaks.append(read_pid(server.process.pid)[1])
            time.sleep(0.25)
        stop.set()
        (report,) = load.result()
        probed = probes.result()
    loaded_s = time.monotonic()
    while one_request_s(server) > idle_s + BATCH_S and time.monotonic() - loaded_s < 10:
        pass
    recovery_s = time.monotonic() - loaded_s

    accepted = report.requests - sum(report.errors.values())
    assert set(report.errors) == {refusal}, report.errors  # nothing but refusals
    assert accepted >= 0.8 * CAPACITY * options.duration_s  # the model kept working at capacity
    assert report.errors[refusal] >= 0.5 * report.requests  # and the excess was shed
    p99 = report.latency_ms["p99"]
    assert p99 is not None
    assert p99 / 1000 < 2 * BOUND_S + 0.5, (p99, BOUND_S)  # slack for a loaded machine
    refused = sorted(seconds for status, seconds, _ in probed if status == 503)
    assert len(refused) >= 10
    assert all(retry == "1" for status, _, retry in probed if status == 503)
    assert refused[len(refused) // 2] < 0.05, refused  # the median refusal takes milliseconds
    assert max(peaks) - rss_before < 64 * 2**20, (rss_before, peaks)  # memory stays flat
    assert recovery_s < 5.0


def test_a_client_that_disconnects_frees_its_queue_slot_and_is_never_computed(tmp_path: Path) -> None:
    calls = tmp_path / "calls.log"
    write_model(
        tmp_path / "repo" / "slow",
        slow_model(1.5, log=calls),
        "max_batch_size = 1\nbatch_timeout_micros = 0\nnum_batch_threads = 1\nmax_enqueued_batches = 2",
    )
    server = launch(tmp_path, str(tmp_path / "repo"))
    try:
        server.wait_for(lambda: server.status("slow") == {"1": "AVAILABLE"}, "the model")
        calls.write_text("")
        with cf.ThreadPoolExecutor(4) as pool:
            running = pool.submit(
                requests.post, f"{server.url}/v2/models/slow/infer", json=V2_BODY, timeout=30
            )
            time.sleep(0.3)  # computing now; the queue holds 2 rows
            abandon_rest(server, count=1)
            abandon_grpc(server)
            server.wait_for(lambda: metric(server, "inferd_queue_rows", model="slow") == 0, "freed slots")
            assert not running.done()  # the slots were freed while the model was still busy
            queued = [
                pool.submit(requests.post, f"{server.url}/v2/models/slow/infer", json=V2_BODY, timeout=30)
                for _ in range(2)
            ]
            assert running.result().status_code == 200
            assert [f.result().status_code for f in queued] == [200, 200]
        assert len(calls.read_text().splitlines()) == 3  # the abandoned two were never computed
    finally:
        server.stop()


def abandon_rest(server: ServerProcess, count: int) -> None:
    """Send ``count`` V2 requests on raw sockets and close each before the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    body = requests.models.complexjson.dumps(V2_BODY).encode()
    head = (
        f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for _ in range(count):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
            time.sleep(0.1)  # queued by now


def abandon_grpc(server: ServerProcess) -> None:
    """Start a V2 gRPC inference and cancel it before the answer."""
    request = service_pb2.ModelInferRequest(model_name="slow")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.0, 1.0])
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request)
        time.sleep(0.2)
        assert call.cancel()


@pytest.mark.parametrize("batched", [True, False])
def test_grpc_deadlines_drop_expired_work_before_it_is_computed(tmp_path: Path, batched: bool) -> None:
    calls = tmp_path / "calls.log"
    base = tmp_path / "repo" / "slow"
    if batched:
        write_model(
            base,
            slow_model(0.5, log=calls),
            "max_batch_size = 1\nbatch_timeout_micros = 0\nnum_batch_threads = 1",
        )
    else:
        write_python_model(base / "1", slow_model(0.5, log=calls), ROW_AWARE_SIGNATURE)
    server = launch(tmp_path, str(tmp_path / "repo"), "--rest_api_num_threads=1")
    try:
        server.wait_for(lambda: server.status("slow") == {"1": "AVAILABLE"}, "the model")
        calls.write_text("")
        client = grpcclient.InferenceServerClient(server.grpc_target)
        x = grpcclient.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
        with cf.ThreadPoolExecutor(5) as pool:
            first = pool.submit(client.infer, "slow", [x], client_timeout=30)
            time.sleep(0.1)  # the one thread is busy with it until 0.5 s
            late = [pool.submit(client.infer, "slow", [x], client_timeout=0.2) for _ in range(4)]
            for future in late:
                with pytest.raises(InferenceServerException) as raised:
                    future.result()
                assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            assert first.result().as_numpy("y").tolist() == [[2.0, 2.0]]
        time.sleep(1.5)  # anything wrongly kept would have run by now
        assert len(calls.read_text().splitlines()) == 1  # the expired four were never computed
        assert client.infer("slow", [x], client_timeout=5).as_numpy("y").tolist() == [[2.0, 2.0]]
        client.close()
    finally:
        server.stop()


def test_the_rest_timeout_covers_the_queue_wait_and_drops_expired_unbatched_work(tmp_path: Path) -> None:
    calls = tmp_path / "calls.log"
    write_python_model(tmp_path / "repo" / "slow" / "1", slow_model(0.5, log=calls), ROW_AWARE_SIGNATURE)
    server = launch(
        tmp_path, str(tmp_path / "repo"), "--rest_api_num_threads=1", "--rest_api_timeout_in_ms=300"
    )
    try:
        server.wait_for(lambda: server.status("slow") == {"1": "AVAILABLE"}, "the model")
        calls.write_text("")
        url = f"{server.url}/v2/models/slow/infer"
        with cf.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: requests.post(url, json=V2_BODY, timeout=10), range(4)))
        assert [r.status_code for r in answers] == [504] * 4  # 0.5 s of work > 0.3 s allowed
        assert "longer than 300 ms" in answers[0].json()["error"]
        time.sleep(1.5)
        assert len(calls.read_text().splitlines()) == 1  # only the one a thread had started
    finally:
        server.stop()
