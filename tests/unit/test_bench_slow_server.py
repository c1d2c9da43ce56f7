"""``inferd bench`` over HTTP against small socket servers whose behaviour is known: one that
answers one request at a time after a fixed delay (a request slower than ``--timeout`` is a
``timeout``, not a success; an open loop it cannot keep up with reports the rate it reached), one
that notes when each request arrives (an open loop's processes take turns), and one that never
completes a handshake (a ``connect_error``, not a silent stall)."""

from __future__ import annotations

import contextlib
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inferd.loadtest.drivers import CLOSED, OPEN, measure
from inferd.loadtest.payloads import Payload, build
from tests.unit.test_bench_reconnect import OK, read_request, running


@contextlib.contextmanager
def serve(delay_s: float) -> Iterator[int]:
    """A server that answers each request ``delay_s`` after reading it, one at a time across all
    its connections (so at most 1 / ``delay_s`` requests per second); yields its port."""
    one_at_a_time = threading.Lock()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with contextlib.suppress(OSError):
                while read_request(self.request):
                    with one_at_a_time:
                        time.sleep(delay_s)
                    self.request.sendall(OK)

    with running(Handler) as port:
        yield port


def payload(tmp_path: Path, port: int) -> Payload:
    (tmp_path / "b.json").write_bytes(b'{"instances": [[1.0]]}')
    return build(f"http://127.0.0.1:{port}", "rest", "m", payload=tmp_path / "b.json")


@pytest.mark.parametrize("mode", [CLOSED, OPEN])
def test_a_request_slower_than_the_timeout_is_a_timeout_in_the_window_too(tmp_path: Path, mode: str) -> None:
    with serve(delay_s=0.5) as port:
        level = 1 if mode == CLOSED else 5
        samples = measure(payload(tmp_path, port), mode, level, time.monotonic_ns(), 0.0, 0.6, timeout_s=0.2)
    assert "200" not in samples.all_statuses  # every answer came 0.5 s after its request
    assert samples.statuses["timeout"] >= 2
    assert samples.messages == ["timeout: no answer within 0.2 s (--timeout)"]


def test_an_open_loop_reports_the_rate_the_server_reached_not_the_rate_it_was_offered(
    tmp_path: Path,
) -> None:
    from inferd.loadtest import BenchOptions, run

    (tmp_path / "b.json").write_bytes(b'{"instances": [[1.0], [2.0]]}')
    with serve(delay_s=0.02) as port:  # 50 requests/s at most, each taking 20 ms
        options = BenchOptions(
            url=f"http://127.0.0.1:{port}",
            model="m",
            payload=tmp_path / "b.json",
            rates=(20, 100),
            duration_s=0.5,
            warmup_s=0,
            metrics_url="",
            price_per_hour=3.6,
        )
        kept, overloaded = run(options)
    assert 14 <= kept.requests_per_s <= 20  # the server kept up (give or take a busy machine)
    # 50 requests fell due in the 0.5 s window; the server took about 1 s to answer them.
    assert overloaded.requests == 50
    assert overloaded.errors == {}
    assert 25 <= overloaded.requests_per_s <= 55  # what the server reached, not the 100 offered
    assert overloaded.predictions_per_s == pytest.approx(2 * overloaded.requests_per_s)
    assert overloaded.cost_per_million_predictions == pytest.approx(1000 / overloaded.predictions_per_s)


def test_the_processes_of_an_open_loop_take_turns_instead_of_sending_together(tmp_path: Path) -> None:
    from inferd.loadtest import BenchOptions, run

    (tmp_path / "b.json").write_bytes(b'{"instances": [[1.0]]}')
    arrivals: list[float] = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while read_request(self.request):
                arrivals.append(time.monotonic())
                self.request.sendall(OK)

    with running(Handler) as port:
        options = BenchOptions(
            url=f"http://127.0.0.1:{port}",
            model="m",
            payload=tmp_path / "b.json",
            rates=(50,),
            duration_s=0.5,
            warmup_s=0,
            processes=2,
            metrics_url="",
        )
        (step,) = run(options)
    assert step.requests == 25  # as many as one process would send, not 2 x 13
    # One request every 20 ms, not two at once every 40 ms.
    assert float(np.median(np.diff(sorted(arrivals)))) > 0.010


def test_a_server_that_never_completes_the_handshake_is_a_connect_error_within_the_timeout(
    tmp_path: Path,
) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: once its queue is full, new handshakes stall
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
    try:
        port = listener.getsockname()[1]
        samples = measure(payload(tmp_path, port), CLOSED, 1, time.monotonic_ns(), 0.0, 0.5, timeout_s=0.2)
    finally:
        for sock in [*fillers, listener]:
            sock.close()
    assert samples.statuses["connect_error"] >= 2
    assert samples.messages == ["connect_error: no connection within 0.2 s (--timeout)"]
