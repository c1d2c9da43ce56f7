"""``inferd bench`` over HTTP keep-alive: a request lost because the server closed a reused
connection as it went out (an idle timeout racing the send) is sent again, not counted as an
error; a connection that fails on its first request is still an error. The server here is a
small socket server that behaves that way on purpose, since the race is too rare to provoke."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inferd.loadtest.drivers import CLOSED, measure
from inferd.loadtest.payloads import Payload, build

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def read_request(sock: socket.socket) -> bool:
    """Read one whole request (headers and Content-Length body); False when the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return True


@contextlib.contextmanager
def running(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    """A threaded TCP server on a free local port, each connection given to ``handler``; yields
    the port and stops the server after."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serve(answers_per_connection: int) -> Iterator[int]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            for _ in range(answers_per_connection):
                if not read_request(self.request):
                    return
                self.request.sendall(OK)
            read_request(self.request)  # the next request arrives; close without answering it

    with running(Handler) as port:
        yield port


@pytest.fixture
def payload_for(tmp_path: Path) -> Callable[[int], Payload]:
    (tmp_path / "b.json").write_bytes(b'{"instances": [[1.0]]}')
    return lambda port: build(f"http://127.0.0.1:{port}", "rest", "m", payload=tmp_path / "b.json")


def test_a_request_lost_on_a_reused_connection_is_sent_again(payload_for: Callable[[int], Payload]) -> None:
    with serve(answers_per_connection=1) as port:
        samples = measure(payload_for(port), CLOSED, 2, time.monotonic_ns(), 0.0, 0.5, timeout_s=5)
        assert samples.statuses.get("200", 0) > 10
        assert set(samples.all_statuses) == {"200"}


def test_a_connection_that_fails_its_first_request_is_an_error(payload_for: Callable[[int], Payload]) -> None:
    with serve(answers_per_connection=0) as port:
        samples = measure(payload_for(port), CLOSED, 1, time.monotonic_ns(), 0.0, 0.3, timeout_s=5)
        assert samples.statuses.get("connection_error", 0) > 0
        assert "200" not in samples.all_statuses


def test_a_grpc_closed_loop_pauses_while_nothing_answers_at_its_address(tmp_path: Path) -> None:
    # It called again at once after each UNAVAILABLE: thousands of errors a second against a
    # server that was down, where the HTTP loop pauses 10 ms after a refused connection.
    import numpy as np

    np.savez(tmp_path / "x.npz", x=np.ones((1, 4), np.float32))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = unused.getsockname()[1]
        payload = build(f"127.0.0.1:{port}", "grpc", "m", payload=tmp_path / "x.npz")
        samples = measure(payload, CLOSED, 2, time.monotonic_ns(), 0.0, 0.5, timeout_s=5)
    assert set(samples.statuses) == {"UNAVAILABLE"}
    assert samples.statuses["UNAVAILABLE"] <= 2 * 0.5 / 0.01 + 20  # one call per 10 ms and caller
