"""End to end: clients that hold the door. Slow and idle connections are closed by their
deadlines, connections past the cap are refused at once, a huge head is refused while it is
read, requests in flight share a byte budget (gRPC refuses a call without its token before
reading its message), and what clients can make the server log is bounded.

Beside each attack a well-behaved client keeps calling; its latency is printed (run with ``-s``),
never asserted: speed belongs to the benchmarks.
"""

from __future__ import annotations

import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as v2_pb
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from tests.conftest import ServerProcess, launch
from tests.models import write_onnx_affine, write_python_model

GOOD_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
WAIT_S = 30.0
"""How long a test waits for the server to close a connection before calling it held: far past
every deadline the tests set, so only a connection that is never closed reaches it."""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("door")
    write_onnx_affine(root / "models" / "affine" / "1", scale=2.0, offset=1.0)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    """Short head and body deadlines, so the slow clients are closed within the test."""
    process = launch(repo, str(repo / "models"), "--header_timeout_s=1", "--body_timeout_s=1")
    yield process
    process.stop()


@contextmanager
def good_client(server: ServerProcess) -> Iterator[list[float]]:
    """A well-behaved REST client calling predict in a loop on a thread while the block runs;
    yields the list its latencies (seconds) go into. Every call must succeed."""
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    r = session.post(f"{server.url}/v2/models/affine/infer", json=GOOD_BODY, timeout=30)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                latencies.append(time.perf_counter() - started)
                stop.wait(0.02)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]
    assert latencies


def report(what: str, latencies: list[float]) -> None:
    """Print the well-behaved client's latency beside an attack (not asserted)."""
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"\n{what}: good client {len(ms)} calls, p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms")


def connect(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open
    after ``WAIT_S``."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server held the connection for {WAIT_S} s; it sent {data[:200]!r}")
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


def test_slow_and_idle_connections_are_closed_by_their_deadlines(server: ServerProcess) -> None:
    attacks: dict[str, bytes] = {
        "nothing": b"",
        "half a request line": b"POST /v2/models/aff",
        "headers without the blank line": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n",
        "10 of 1,000 body bytes": (
            b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789"
        ),
    }
    answers: dict[str, bytes] = {}
    with good_client(server) as latencies:
        sockets = {name: connect(server) for name in [*attacks, "a header line every 0.3 s"]}
        for name, data in attacks.items():
            sockets[name].sendall(data)
        dripping = sockets.pop("a header line every 0.3 s")
        dripping.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        dripped = 0
        for dripped in range(int(WAIT_S / 0.3)):  # each line well within any per-read timeout
            dripping.sendall(b"X-Drip-%d: 1\r\n" % dripped)
            if select.select([dripping], [], [], 0.3)[0]:  # the server answered: stop dripping
                break
        answers["a header line every 0.3 s"] = read_until_closed(dripping)
        for name, sock in sockets.items():
            answers[name] = read_until_closed(sock)
    report("slow and idle connections", latencies)
    assert dripped < int(WAIT_S / 0.3) - 1, "the dripping client was never cut off"
    assert answers["nothing"] == b""
    for name in ("half a request line", "headers without the blank line", "a header line every 0.3 s"):
        assert answers[name].startswith(b"HTTP/1.1 408 "), (name, answers[name])
        assert b"--header_timeout_s" in answers[name]
    assert answers["10 of 1,000 body bytes"].startswith(b"HTTP/1.1 408 ")
    assert b"--body_timeout_s" in answers["10 of 1,000 body bytes"]


def test_a_body_answered_before_it_arrived_is_not_waited_for_nor_answered_twice(
    server: ServerProcess,
) -> None:
    """A body refused from its Content-Length (413) that then never comes: the connection is
    closed at the body deadline, after the one answer."""
    sock = connect(server)
    sock.sendall(
        b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer


def test_idle_keep_alive_connections_are_closed(repo: Path) -> None:
    server = launch(repo, str(repo / "models"), "--keep_alive_timeout_s=0.5")
    try:
        sock = connect(server)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_until_closed(sock)  # answered, then closed once idle for 0.5 s
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        server.stop()


def test_connections_past_the_cap_are_refused_at_once_and_the_others_keep_working(repo: Path) -> None:
    cap = 12
    server = launch(repo, str(repo / "models"), f"--max_connections={cap}")
    held: list[socket.socket] = []
    try:
        with good_client(server) as latencies:
            server.wait_for(lambda: len(latencies) > 0, "the good client's first call")
            # the good client holds one kept-alive connection; the attacker takes the rest and more
            for _ in range(cap + 20):
                sock = connect(server)
                sock.sendall(b"GET /v2/heal")  # half a request line, held for --header_timeout_s
                held.append(sock)
            refused = [read_until_closed(sock) for sock in held[cap:]]
            with grpc.insecure_channel(server.grpc_target) as channel:  # the gRPC port still answers
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            calls = len(latencies)
            server.wait_for(lambda: len(latencies) > calls + 5, "the good client to keep being answered")
        report(f"{len(held)} connections against a cap of {cap}", latencies)
        # A refused connection gets 503 at accept; one whose request was in flight may see the close.
        assert len(refused) >= 19
        assert all(answer == b"" or answer.startswith(b"HTTP/1.1 503 ") for answer in refused), refused[:3]
        assert any(b"--max_connections" in answer for answer in refused), refused[:3]
        for sock in held:
            sock.close()
        held.clear()
        server.wait_for(
            lambda: requests.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200,
            "new connections to be accepted again",
        )
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_grpc_connections_that_send_nothing_are_closed_by_the_header_timeout(repo: Path) -> None:
    """Silent connections fill the gRPC port's cap; each is closed once ``--header_timeout_s``
    passes without the client acknowledging the server's HTTP/2 settings (gRPC's own default
    was a minute, whatever the flag said), and calls are taken again."""
    server = launch(repo, str(repo / "models"), "--max_connections=2", "--header_timeout_s=1")
    host, port = server.grpc_target.rsplit(":", 1)
    silent = [socket.create_connection((host, int(port)), timeout=WAIT_S) for _ in range(2)]
    try:
        with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        started = time.monotonic()
        for sock in silent:
            read_until_closed(sock)  # the server's settings, then its GOAWAY, then the close
        held_s = time.monotonic() - started
        with grpc.insecure_channel(server.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert held_s < 10, f"the silent connections were held {held_s:.1f} s"
    finally:
        for sock in silent:
            sock.close()
        server.stop()


def _peak_rss_kib(server: ServerProcess) -> int:
    """The server process's peak resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def _refused_while_streamed(server: ServerProcess, opening: bytes, what: str) -> None:
    """Send ``opening``, then 64 MiB of one field value, 64 KiB at a time: the server answers 413
    naming ``--max_header_bytes`` before the end, its peak RSS grows by less than 16 MiB, and a
    good client is served meanwhile."""
    peak = _peak_rss_kib(server)
    sent = 0
    with good_client(server) as latencies:
        sock = connect(server)
        sock.sendall(opening)
        try:
            for _ in range(64 * 16):
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:  # refused and closed before the end
            pass
        answer = read_until_closed(sock)
    report(f"a 64 MiB {what}", latencies)
    grown_kib = _peak_rss_kib(server) - peak
    print(f"sent {sent >> 10} KiB of {what} before the refusal; peak RSS grew {grown_kib} KiB")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"--max_header_bytes" in answer
    assert grown_kib < 16 * 1024


def test_a_huge_header_is_refused_while_it_is_read(server: ServerProcess) -> None:
    _refused_while_streamed(server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Huge: ", "header")


def test_a_huge_trailer_is_refused_while_it_is_read(server: ServerProcess) -> None:
    """A chunked request's trailer field streamed without end; the parser would hold the value
    whole."""
    body = b'{"instances": [[1.0, 2.0, 3.0, 4.0]]}'
    head = b"POST /v1/models/affine:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    _refused_while_streamed(server, head + b"%x\r\n%s\r\n0\r\nX-Huge: " % (len(body), body), "trailer")


def test_a_websocket_upgrade_and_malformed_requests_do_not_flood_the_log(server: ServerProcess) -> None:
    before = server.log().count("\n")
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for _ in range(20):
        r = requests.get(f"{server.url}/v2/models/affine", headers=upgrade, timeout=10)
        # inferd serves no WebSocket: it ignores the Upgrade header (RFC 9110 7.8) and answers
        assert r.status_code == 200, r.text
    with good_client(server) as latencies:
        for _ in range(300):
            sock = connect(server)
            sock.sendall(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
    report("300 malformed requests", latencies)
    assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    log = server.log().splitlines()[before:]
    print(f"{len(log)} log lines after 20 upgrades and 300 malformed requests")
    assert not [line for line in log if " ERROR " in line], log[:5]
    assert len(log) <= 12, log[:20]
    assert any("suppressed" in line for line in log), log


def test_requests_in_flight_share_a_byte_budget(repo: Path) -> None:
    mib = 1 << 20
    budget = 8 * mib + 256 * 1024  # the stalled bodies leave room for the good client's small ones
    server = launch(
        repo, str(repo / "models"), f"--max_request_bytes={4 * mib}", f"--max_inflight_bytes={budget}"
    )
    stalled: list[socket.socket] = []
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'

    def refused() -> bool:
        r = requests.post(f"{server.url}/v2/models/affine/infer", data=body + b" " * mib, timeout=10)
        return r.status_code == 503

    def refused_unread() -> bool:
        """Whether a body of 1 MiB declared is refused before any of it is sent; a probe that
        holds nothing of the budget either way (it sends no body and hangs up)."""
        with connect(server) as sock:
            sock.sendall(
                b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % mib
            )
            sock.settimeout(1.0)
            try:
                return sock.recv(64).startswith(b"HTTP/1.1 503")
            except TimeoutError:
                return False  # admitted: waiting for the body

    def stall(sent: int) -> None:
        """A body of 4 MiB declared, ``sent`` bytes of it sent, the rest never."""
        sock = connect(server)
        head = b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        sock.sendall(head % (4 * mib) + b"{" + b" " * (sent - 1))
        stalled.append(sock)

    try:
        with good_client(server) as latencies:
            # Bodies declared and trickled hold only what they sent: sixteen of them could
            # otherwise take the budget, and every request with a body, for a few bytes a second.
            for _ in range(4):
                stall(1)
            for _ in range(10):
                assert not refused()
            for sock in stalled:
                sock.close()
            stalled.clear()
            for _ in range(2):  # two bodies of 4 MiB declared and nearly all sent: 8 MiB held
                stall(4 * mib - 16)
            server.wait_for(refused_unread, "the budget to be held by the stalled bodies")
            r = requests.post(f"{server.url}/v2/models/affine/infer", data=body + b" " * mib, timeout=10)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert "--max_inflight_bytes" in r.json()["error"]
            request = v2_pb.ModelInferRequest(model_name="affine")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(np.arange(4, dtype="<f4").tobytes() + b"\0" * mib)
            with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as gone:
                v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
            assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "--max_inflight_bytes" in (gone.value.details() or "")
            for sock in stalled:  # hanging up releases what they held
                sock.close()
            stalled.clear()
            server.wait_for(lambda: not refused(), "the budget to be released by the hang-ups")
        report("budget held by two stalled 4 MiB bodies", latencies)
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


STRING_LENGTHS = """
def load(self):
    pass

def predict(self, inputs):
    return {"n": np.array([len(t) for t in inputs["text"]], dtype=np.int64)}
"""
STRING_SIGNATURE = (
    '{"inputs": [{"name": "text", "dtype": "string", "shape": [-1]}], '
    '"outputs": [{"name": "n", "dtype": "int64", "shape": [-1]}]}'
)


def test_decoded_strings_are_held_in_the_byte_budget(tmp_path: Path) -> None:
    """Two-byte strings take six bytes on the wire and about 70 in memory once decoded: a 0.9 MB
    request of them took the budget's 8 MiB unseen. Held now, over every protocol, a request
    that could never fit the budget is refused (413 / RESOURCE_EXHAUSTED); one that fits is
    answered."""
    write_python_model(tmp_path / "models" / "lengths" / "1", STRING_LENGTHS, STRING_SIGNATURE)
    mib = 1 << 20
    server = launch(
        tmp_path,
        str(tmp_path / "models"),
        f"--max_request_bytes={4 * mib}",
        f"--max_inflight_bytes={8 * mib}",
    )

    def v2_binary(count: int) -> requests.Response:
        raw = (struct.pack("<I", 2) + b"ab") * count
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "text",
                        "datatype": "BYTES",
                        "shape": [count],
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ]
            }
        ).encode()
        return requests.post(
            f"{server.url}/v2/models/lengths/infer",
            data=header + raw,
            headers={"Inference-Header-Content-Length": str(len(header))},
            timeout=30,
        )

    try:
        many = 150_000  # 0.9 MB on the wire; about 11 MB held decoded
        for answer in (
            v2_binary(many),
            requests.post(
                f"{server.url}/v1/models/lengths:predict", json={"inputs": ["ab"] * many}, timeout=30
            ),
        ):
            assert answer.status_code == 413, answer.text[:300]
            assert f"{many} string elements" in answer.text
            assert "--max_inflight_bytes" in answer.text
        request = v2_pb.ModelInferRequest(model_name="lengths")
        request.inputs.add(name="text", datatype="BYTES", shape=[many]).contents.bytes_contents.extend(
            [b"ab"] * many
        )
        with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as refused:
            v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max_inflight_bytes" in (refused.value.details() or "")
        answer = v2_binary(50_000)  # about 3.8 MB held: answered
        assert answer.status_code == 200, answer.text[:300]
        assert answer.json()["outputs"][0]["data"] == [2] * 50_000
    finally:
        server.stop()


def test_one_long_string_among_many_short_ones_is_not_padded_to_all_of_them(tmp_path: Path) -> None:
    """numpy reads JSON strings as a text array padded to the longest string: one of 100,000
    characters among 3,000 short values, a 112 KB request, took 1.1 GiB and 2.7 s. Such values
    are read as objects now, over TF Serving JSON and V2 JSON, with the same answers and errors."""
    write_python_model(tmp_path / "models" / "lengths" / "1", STRING_LENGTHS, STRING_SIGNATURE)
    write_onnx_affine(tmp_path / "models" / "affine" / "1", scale=2.0, offset=1.0)
    server = launch(tmp_path, str(tmp_path / "models"))
    texts = ["x" * 100_000] + ["a"] * 3_000
    try:
        before = _peak_rss_kib(server)
        tf = requests.post(f"{server.url}/v1/models/lengths:predict", json={"instances": texts}, timeout=60)
        assert tf.status_code == 200, tf.text[:300]
        assert tf.json()["predictions"] == [100_000] + [1] * 3_000
        entry = {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}
        v2 = requests.post(f"{server.url}/v2/models/lengths/infer", json={"inputs": [entry]}, timeout=60)
        assert v2.status_code == 200, v2.text[:300]
        assert v2.json()["outputs"][0]["data"] == [100_000] + [1] * 3_000
        mixed = [[1, 2, 3, "x" * 100_000]] + [[1, 2, 3, 4]] * 3_000
        tf = requests.post(f"{server.url}/v1/models/affine:predict", json={"instances": mixed}, timeout=60)
        assert tf.status_code == 400
        assert tf.json()["error"].startswith('JSON Value: "xxx')
        assert "not of expected type: float" in tf.json()["error"]
        entry = {"name": "x", "datatype": "FP32", "shape": [3_001, 4], "data": mixed}
        v2 = requests.post(f"{server.url}/v2/models/affine/infer", json={"inputs": [entry]}, timeout=60)
        assert v2.status_code == 400
        assert v2.json()["error"] == "input 'x': 'data' mixes strings with other JSON values"
        grown_mib = (_peak_rss_kib(server) - before) / 1024
        print(f"\npeak memory grew {grown_mib:.0f} MiB")
        assert grown_mib < 256
    finally:
        server.stop()


def test_grpc_refuses_a_call_without_its_token_before_reading_its_message(repo: Path) -> None:
    server = launch(repo, str(repo / "models"), "--api_token=door-token", wait=False)

    def live() -> bool:
        try:
            headers = {"authorization": "Bearer door-token"}
            return requests.get(f"{server.url}/v2/health/live", headers=headers, timeout=2).ok
        except requests.ConnectionError:
            return False

    try:
        server.wait_for(live, "the REST port to answer", timeout_s=60)
        peak = _peak_rss_kib(server)
        request = v2_pb.ModelInferRequest(model_name="affine")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(b"\0" * (60 << 20))
        codes: list[grpc.StatusCode] = []

        def call() -> None:
            options = [("grpc.max_send_message_length", -1)]
            with grpc.insecure_channel(server.grpc_target, options=options) as channel:
                try:
                    v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        grown_kib = _peak_rss_kib(server) - peak
        print(f"\n8 unauthenticated 60 MiB gRPC calls: peak RSS grew {grown_kib >> 10} MiB")
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 8
        assert grown_kib < 192 * 1024  # 480 MiB were sent; each read whole would cost twice that
    finally:
        server.stop()


def test_a_large_json_body_is_decoded_off_the_event_loop(server: ServerProcess) -> None:
    """A 48 MiB JSON body is decoded on another thread than the event loop's (the process's main
    thread) or in a decode process: the CPU time it costs is counted there
    (``/proc/<pid>/task/<tid>/stat``, ``/proc/<child>/stat``). Before,
    the event loop decoded it in one step with its answer, and nobody else was answered meanwhile.
    (The decoder holds the GIL while it parses, so the loop is not free all the while; the
    latency the good client sees is printed.)"""
    count = 48 * 1024 * 1024 // 8
    data = b",".join([b"0.1234"] * count)  # 7 bytes a value: 48 MiB; the shape wants 4 values
    big = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [' + data + b"]}]}"
    head = b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big)
    sock = connect(server)
    with good_client(server) as latencies:
        before = _thread_cpu_ticks(server)
        children_before = _process_cpu_ticks(server.process.pid)
        sock.sendall(head + big)
        sent = len(latencies)
        answer = read_until_closed_or_answered(sock)
        during = len(latencies) - sent
        after = _thread_cpu_ticks(server)
        children = _process_cpu_ticks(server.process.pid)
    report("a 48 MiB JSON body decoding", latencies)
    main = after.pop(server.process.pid) - before.get(server.process.pid, 0)
    others = sum(ticks - before.get(tid, 0) for tid, ticks in after.items())
    children.pop(server.process.pid)
    others += sum(ticks - children_before.get(pid, 0) for pid, ticks in children.items())
    print(f"{during} good calls answered between the body's last byte and its answer")
    print(f"CPU ticks while it was decoded: event loop {main}, other threads and processes {others}")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"shape needs 4 elements" in answer
    assert others > main


LARGE_ROWS = 512 * 1024
"""Rows of 4 FP32 values in each large body: ~16 MiB of JSON, past the size from which bodies
are decoded in a decode process."""


def _large_bodies() -> list[tuple[str, bytes]]:
    """Four legal V2 JSON bodies and one legal TF Serving v1 body of ~16 MiB each, as (path,
    body). The V2 ones ask for their output as binary data, so that answering them costs little."""
    row = b"[0.1234,0.5678,0.9012,0.3456]"
    rows = b",".join([row] * LARGE_ROWS)
    v2 = (
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [%d, 4], "data": [%s]}], '
        b'"parameters": {"binary_data_output": true}}' % (LARGE_ROWS, rows)
    )
    v1 = b'{"inputs": [%s]}' % rows  # the columnar format: 'instances' is capped at 100,000 rows
    return [("/v2/models/affine/infer", v2)] * 4 + [("/v1/models/affine:predict", v1)]


def _process_cpu_ticks(pid: int) -> dict[int, int]:
    """User + system CPU ticks of ``pid`` and of each of its child processes, by process id."""
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):  # the process ended meanwhile
            continue
        process = int(stat.parent.name)
        if process == pid or int(fields[1]) == pid:  # fields[1]: the parent's id
            ticks[process] = int(fields[11]) + int(fields[12])
    return ticks


def test_large_json_bodies_are_decoded_in_another_process(server: ServerProcess) -> None:
    """Four large legal V2 JSON bodies and a large v1 predict body, sent at once, are decoded in
    a decode process (a child of the server), not in the server process whose thread runs the
    event loop: they never take its GIL. Most of the CPU time they cost is counted in the
    children (``/proc/<pid>/stat``), and each body's answer is right. Before, they were decoded
    on the server's decode thread, which held the GIL the event loop needs for whole parses.
    The well-behaved client's latency meanwhile is printed."""
    bodies = _large_bodies()
    answers: list[bytes] = [b""] * len(bodies)

    def send(i: int, path: str, body: bytes) -> None:
        sock = connect(server)
        head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body))
        sock.sendall(head + body)
        answers[i] = read_until_closed_or_answered(sock)

    senders = [threading.Thread(target=send, args=(i, *item)) for i, item in enumerate(bodies)]
    with good_client(server) as latencies:
        before = _process_cpu_ticks(server.process.pid)
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=120)
        after = _process_cpu_ticks(server.process.pid)
    report("four 16 MiB V2 JSON bodies and one 16 MiB v1 body decoding", latencies)
    server_ticks = after.pop(server.process.pid) - before.get(server.process.pid, 0)
    child_ticks = sum(ticks - before.get(pid, 0) for pid, ticks in after.items())
    print(f"CPU ticks while they were decoded: server process {server_ticks}, decode processes {child_ticks}")
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert b'"shape":[%d,4]' % LARGE_ROWS in answers[0].replace(b" ", b"")
    assert answers[-1].count(b"[1.2468,2.1356,2.8024,1.6912]") == LARGE_ROWS
    assert child_ticks > server_ticks


def test_a_large_body_nested_deep_beside_its_data_comes_back_from_its_decode_process(
    server: ServerProcess,
) -> None:
    """A body over 1 MiB is decoded in a decode process, which pickles the document back: with
    parameters nested 900 deep (orjson reads 1,024), that raised RecursionError, a 500, where
    the same document under 1 MiB, decoded in the server, was answered."""
    deep: object = 0
    for _ in range(900):
        deep = [deep]
    rows = 60_000
    data = [1.0, 2.0, 3.0, 4.0] * rows
    body = {
        "parameters": {"deep": deep},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": data}],
    }
    encoded = json.dumps(body).encode()
    assert len(encoded) > 1 << 20
    answer = requests.post(f"{server.url}/v2/models/affine/infer", data=encoded, timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["outputs"][0]["data"][:4] == [3.0, 5.0, 7.0, 9.0]


def _kill_busy_decoder(server: ServerProcess, known: set[int]) -> int:
    """SIGKILL the server's child process not in ``known`` that is using CPU (a decode process at
    work; the multiprocessing resource tracker, also a child, idles), once it has used 5 ticks.
    Returns its process id; fails if none is seen working within ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    first: dict[int, int] = {}
    while time.monotonic() < deadline:
        for pid, ticks in _process_cpu_ticks(server.process.pid).items():
            if pid == server.process.pid or pid in known:
                continue
            if ticks - first.setdefault(pid, ticks) >= 5:
                os.kill(pid, 9)
                return pid
        time.sleep(0.01)
    pytest.fail("no decode process was seen decoding")


def test_a_decode_process_that_dies_fails_only_its_own_request(server: ServerProcess) -> None:
    """A decode process killed while it decodes a large body is replaced and the body decoded
    again (answer 200); killed twice for the same body, that request alone is answered 503, and
    the next large body is decoded by a fresh decode process (200)."""
    path, body = _large_bodies()[0]
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body))

    def send() -> bytes:
        sock = connect(server)
        sock.sendall(head + body)
        return read_until_closed_or_answered(sock)

    killed: set[int] = set()
    for kills, status in ((1, b"200"), (2, b"503")):
        answers: list[bytes] = []
        sender = threading.Thread(target=lambda out=answers: out.append(send()))
        sender.start()
        for _ in range(kills):
            killed.add(_kill_busy_decoder(server, killed))
        sender.join(timeout=120)
        assert len(answers) == 1
        assert answers[0].startswith(b"HTTP/1.1 %s " % status), answers[0][:300]
    assert b"the process decoding this request body exited" in answers[0]
    assert send().startswith(b"HTTP/1.1 200 ")


def _thread_cpu_ticks(server: ServerProcess) -> dict[int, int]:
    """User + system CPU ticks of each thread of the server process, by thread id."""
    ticks = {}
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        ticks[int(task.name)] = int(fields[11]) + int(fields[12])
    return ticks


def read_until_closed_or_answered(sock: socket.socket) -> bytes:
    """The server's answer to one request on ``sock`` (headers and ``Content-Length`` bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    sock.close()
    return head + b"\r\n\r\n" + body


STORM = """
import sys, grpc
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as stubs
request = pb.ModelInferRequest(model_name="affine")
request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
with grpc.insecure_channel(sys.argv[1]) as channel:
    infer = stubs.GRPCInferenceServiceStub(channel).ModelInfer
    for _ in range(int(sys.argv[2])):
        infer.future(request, timeout=10).cancel()
"""


def test_a_grpc_call_and_cancel_storm_leaves_other_clients_unharmed(server: ServerProcess) -> None:
    """The Rapid Reset pattern from another process (its own connection): every call of the
    well-behaved gRPC client succeeds; its latency is printed beside the storm's rate."""
    request = v2_pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def good() -> None:
        with grpc.insecure_channel(server.grpc_target) as channel:
            infer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    infer(request, timeout=30)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()} {exc.details()}")
                latencies.append(time.perf_counter() - started)
                stop.wait(0.01)

    thread = threading.Thread(target=good)
    thread.start()
    try:
        calls = 10_000
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", STORM, server.grpc_target, str(calls)], check=True, timeout=300)
        rate = calls / (time.monotonic() - started)
    finally:
        stop.set()
        thread.join()
    report(f"{calls} gRPC calls opened and cancelled at {rate:.0f}/s", latencies)
    assert not failures, failures[:3]
    assert latencies
    health = requests.get(f"{server.url}/v2/health/ready", timeout=10)
    assert health.status_code == 200


SLOW = """
thread_safe = True

def load(self):
    pass

def predict(self, inputs):
    import os, time
    deadline = time.monotonic() + 60
    while not os.path.exists(os.environ["INFERD_TEST_GATE"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"y": inputs["x"]}
"""


def test_one_grpc_connection_holds_a_bounded_number_of_calls(tmp_path: Path) -> None:
    """300 calls at once on one connection: the server runs at most its stream limit (128) plus
    gRPC core's small overload margin at once and refuses the rest with UNAVAILABLE (retryable,
    HTTP/2 REFUSED_STREAM) instead of holding them all; once released, the calls it took succeed."""
    write_python_model(tmp_path / "models" / "slow" / "1", SLOW)
    (tmp_path / "models" / "slow" / "inferd.toml").write_text("warmup = false\n")
    gate = tmp_path / "gate"
    os.environ["INFERD_TEST_GATE"] = str(gate)
    try:
        server = launch(tmp_path, str(tmp_path / "models"))
    finally:
        del os.environ["INFERD_TEST_GATE"]
    try:
        request = v2_pb.ModelInferRequest(model_name="slow")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1, 2])
        seen: list[float] = []

        def in_flight() -> float:
            text = requests.get(f"{server.url}/metrics", timeout=10).text
            prefix = "inferd_in_flight_requests "
            value = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))
            seen.append(value)
            return value

        with grpc.insecure_channel(server.grpc_target) as channel:
            infer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            calls = [infer.future(request, timeout=120) for _ in range(300)]
            server.wait_for(lambda: in_flight() >= 128, "128 calls to be in flight")
            for _ in range(20):  # more looks while the calls are held: none past the bound
                in_flight()
            gate.touch()
            codes = []
            for call in calls:
                try:
                    call.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        ok = codes.count(grpc.StatusCode.OK)
        print(f"\nat most {max(seen):.0f} of 300 calls in flight on one connection; {ok} answered")
        assert max(seen) < 200
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert ok >= 128
    finally:
        server.stop()
