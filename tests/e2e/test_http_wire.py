"""End to end: the REST port's HTTP/1.1 wire, over raw sockets. Pipelined requests, ``Expect:
100-continue``, HTTP/1.0, HEAD, chunked and slow bodies, bodies past uvicorn's 64 KiB read pause,
keep-alive reuse, ``Connection: close``, malformed requests, percent-encoded paths, query
strings, SIGTERM with kept-alive connections, and clients that hang up mid-body.

These pin what uvicorn's per-request cycle gives the REST port today, so that a cycle of
inferd's own (``protocols/http_connection.py``) keeps it. Every read waits at most
``RECV_TIMEOUT_S``: a server that goes silent fails the test instead of hanging it.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import select
import signal
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.conftest import ServerProcess, launch
from tests.models import write_onnx_affine, write_python_model

RECV_TIMEOUT_S = 10.0
"""The longest any read or write on a test's socket waits; past it the test fails."""

MAX_REQUEST_BYTES = 4_000_000
"""The module server's ``--max_request_bytes``."""

LARGE_ROWS = 50_000
"""Rows of the large predict body: ~1.1 MB of JSON, far past uvicorn's 64 KiB read pause."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer as read off the wire."""

    status: int
    reason: str
    headers: dict[str, str]
    """Lower-case names; each name at most once."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Wire:
    """One raw client connection to the REST port; answers are parsed by their Content-Length,
    so that bytes of one answer left over show up in the next."""

    def __init__(self, server: ServerProcess) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=RECV_TIMEOUT_S)
        self.buffer = b""

    def __enter__(self) -> Wire:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(RECV_TIMEOUT_S)
        self.sock.sendall(data)

    def _recv(self, timeout_s: float = RECV_TIMEOUT_S) -> bytes:
        """One read: b"" once the server closed (or reset) the connection; fails the test when
        nothing comes within ``timeout_s``."""
        self.sock.settimeout(timeout_s)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"nothing from the server within {timeout_s} s; unread: {self.buffer[:300]!r}")
        except ConnectionResetError:
            return b""

    def _fill(self, what: str) -> None:
        chunk = self._recv()
        if not chunk:
            pytest.fail(f"the server closed the connection in the middle of {what}: {self.buffer[:300]!r}")
        self.buffer += chunk

    def read_head(self) -> tuple[int, str, dict[str, str]]:
        """The next answer's status line and header fields (status, reason, headers)."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill("an answer's head")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        line, *fields = head.split(b"\r\n")
        version, status, reason = line.decode("latin-1").split(" ", 2)
        assert version == "HTTP/1.1", head
        headers: dict[str, str] = {}
        for field in fields:
            name, colon, value = field.decode("latin-1").partition(":")
            assert colon, head
            assert name, head
            assert name == name.strip(), head
            assert name.lower() not in headers, f"{name} twice in {head!r}"
            headers[name.lower()] = value.strip()
        return int(status), reason, headers

    def read_answer(self, *, to_head: bool = False) -> Answer:
        """The next whole answer; ``to_head``: the answer to a HEAD request, which has no body
        whatever its Content-Length says."""
        status, reason, headers = self.read_head()
        body = b""
        if not to_head:
            assert "transfer-encoding" not in headers, headers
            length = int(headers["content-length"])
            while len(self.buffer) < length:
                self._fill(f"a body of {length} bytes")
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(status, reason, headers, body)

    def nothing_more(self, wait_s: float = 0.3) -> None:
        """No byte arrives within ``wait_s`` and the connection stays open."""
        assert self.buffer == b"", self.buffer[:300]
        if select.select([self.sock], [], [], wait_s)[0]:
            data = self._recv()
            pytest.fail(
                f"expected silence, got {data[:300]!r}" if data else "the server closed the connection"
            )

    def closed_by_server(self, within_s: float = RECV_TIMEOUT_S) -> None:
        """The server closes the connection within ``within_s``, sending nothing more."""
        assert self.buffer == b"", self.buffer[:300]
        data = self._recv(within_s)
        assert data == b"", f"expected the close, got {data[:300]!r}"


def request(
    method: str, path: str, body: bytes | None = None, *headers: str, version: str = "HTTP/1.1"
) -> bytes:
    """A whole request; a Host header is added for HTTP/1.1, Content-Length when there is a body."""
    lines = [f"{method} {path} {version}", *(["Host: inferd"] if version == "HTTP/1.1" else []), *headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def predict_body(rows: list[list[float]]) -> bytes:
    return json.dumps({"instances": rows}).encode()


def predict(rows: list[list[float]], *headers: str, path: str = "/v1/models/affine:predict") -> bytes:
    """A TF Serving predict request of ``rows`` for the ``affine`` model (x * 2 + 1)."""
    return request("POST", path, predict_body(rows), "Content-Type: application/json", *headers)


def affine(rows: list[list[float]], scale: float = 2.0, offset: float = 1.0) -> dict[str, Any]:
    """The predict answer's JSON for ``rows``."""
    return {"predictions": [[x * scale + offset for x in row] for row in rows]}


STATUS = request("GET", "/v1/models/affine")
"""TF Serving's model status request for ``affine``."""


def assert_status(answer: Answer) -> None:
    """``answer`` is a 200 model status of ``affine`` with version 1 AVAILABLE."""
    assert answer.status == 200, answer
    versions = answer.json()["model_version_status"]
    assert [(v["version"], v["state"]) for v in versions] == [("1", "AVAILABLE")], versions


def assert_predicted(
    answer: Answer, rows: list[list[float]], scale: float = 2.0, offset: float = 1.0
) -> None:
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == affine(rows, scale, offset)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``affine`` (x * 2 + 1) and ``my_model`` (x * 3); kept-alive connections stay open 30 s, so
    that a close seen within a test is the server's choice, not the idle deadline."""
    root = tmp_path_factory.mktemp("wire")
    write_onnx_affine(root / "models" / "affine" / "1", scale=2.0, offset=1.0)
    write_onnx_affine(root / "models" / "my_model" / "1", scale=3.0)
    process = launch(
        root,
        str(root / "models"),
        f"--max_request_bytes={MAX_REQUEST_BYTES}",
        "--body_timeout_s=5",
        "--keep_alive_timeout_s=30",
    )
    yield process
    process.stop()


def test_pipelined_requests_are_answered_in_order_each_whole(server: ServerProcess) -> None:
    """Two, then three requests written at once on one kept-alive connection are each answered,
    in order and whole, and the connection then serves one more."""
    with Wire(server) as wire:
        wire.send(predict([[1, 2, 3, 4]]) + STATUS)
        assert_predicted(wire.read_answer(), [[1, 2, 3, 4]])
        assert_status(wire.read_answer())
        wire.nothing_more(0.1)
        wire.send(predict([[0, 0, 0, 0]]) + STATUS + predict([[5, 6, 7, 8], [-1, -2, -3, -4]]))
        assert_predicted(wire.read_answer(), [[0, 0, 0, 0]])
        assert_status(wire.read_answer())
        assert_predicted(wire.read_answer(), [[5, 6, 7, 8], [-1, -2, -3, -4]])
        wire.nothing_more(0.1)
        wire.send(predict([[9, 9, 9, 9]]))
        assert_predicted(wire.read_answer(), [[9, 9, 9, 9]])


def test_expect_100_continue_is_answered_before_the_body(server: ServerProcess) -> None:
    """A POST with ``Expect: 100-continue`` gets ``100 Continue`` on its head alone, its answer
    once the body follows, and the connection then serves another request."""
    body = predict_body([[1, 2, 3, 4]])
    head = request("POST", "/v1/models/affine:predict", body, "Expect: 100-continue")
    with Wire(server) as wire:
        wire.send(head.removesuffix(body))
        assert wire.read_head() == (100, "Continue", {})
        wire.nothing_more()  # no final answer before the body
        wire.send(body)
        assert_predicted(wire.read_answer(), [[1, 2, 3, 4]])
        wire.send(STATUS)
        assert_status(wire.read_answer())


def test_expect_100_continue_in_http_1_0_is_ignored(server: ServerProcess) -> None:
    """An HTTP/1.0 request's ``Expect: 100-continue`` is ignored (RFC 9110 10.1.1): nothing is
    sent on its head alone, and its one answer follows its body."""
    body = predict_body([[1, 2, 3, 4]])
    head = request("POST", "/v1/models/affine:predict", body, "Expect: 100-continue", version="HTTP/1.0")
    with Wire(server) as wire:
        wire.send(head.removesuffix(body))
        wire.nothing_more()
        wire.send(body)
        assert_predicted(wire.read_answer(), [[1, 2, 3, 4]])
        wire.closed_by_server()


def test_a_body_over_the_limit_is_refused_before_it_is_sent(server: ServerProcess) -> None:
    """A Content-Length over ``--max_request_bytes`` with ``Expect: 100-continue`` gets 413 at
    once, without ``100 Continue``; a client that then sends the body anyway has it read and
    discarded, and its next request on the connection is answered."""
    size = MAX_REQUEST_BYTES + 1_000_000
    head = "POST /v1/models/affine:predict HTTP/1.1\r\nHost: inferd\r\nExpect: 100-continue\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    with Wire(server) as wire:
        wire.send(head.encode())
        refused = wire.read_answer()
        assert refused.status == 413, refused
        assert "--max_request_bytes" in refused.json()["error"]
        wire.nothing_more()
        wire.send(b" " * size + STATUS)
        assert_status(wire.read_answer())


def test_http_1_0_is_answered_with_connection_close_and_closed(server: ServerProcess) -> None:
    """An HTTP/1.0 request without keep-alive (with no Host header, which 1.0 does not need) is
    answered as HTTP/1.1 with ``connection: close``, and the server closes the connection."""
    with Wire(server) as wire:
        wire.send(request("GET", "/v1/models/affine", version="HTTP/1.0"))
        answer = wire.read_answer()
        assert_status(answer)
        assert answer.headers["connection"] == "close"
        wire.closed_by_server()
    with Wire(server) as wire:
        body = predict_body([[1, 2, 3, 4]])
        wire.send(request("POST", "/v1/models/affine:predict", body, version="HTTP/1.0"))
        answer = wire.read_answer()
        assert_predicted(answer, [[1, 2, 3, 4]])
        assert answer.headers["connection"] == "close"
        wire.closed_by_server()


def test_head_is_answered_without_body_bytes(server: ServerProcess) -> None:
    """HEAD on a GET route gets the GET's status and headers, its Content-Length included, and
    no body: the request pipelined behind it, and one sent after a pause, are answered in step."""
    with Wire(server) as wire:
        wire.send(request("HEAD", "/v1/models/affine") + STATUS)
        to_head = wire.read_answer(to_head=True)
        got = wire.read_answer()
        assert_status(got)
        assert (to_head.status, without_date(to_head)) == (got.status, without_date(got))
        wire.send(request("HEAD", "/v2/health/live"))
        assert wire.read_answer(to_head=True).status == 200
        wire.send(request("HEAD", "/v1/models/affine"))
        again = wire.read_answer(to_head=True)
        assert (again.status, without_date(again)) == (to_head.status, without_date(to_head))
        wire.nothing_more()  # no body bytes trail the head
        wire.send(STATUS)
        assert_status(wire.read_answer())


def without_date(answer: Answer) -> dict[str, str]:
    return {name: value for name, value in answer.headers.items() if name != "date"}


def test_a_chunked_body_sent_in_pieces_is_answered(server: ServerProcess) -> None:
    """A predict body in ``Transfer-Encoding: chunked``, its chunks (and a chunk split inside its
    data) sent in separate writes with pauses, is answered 200; the connection then serves the
    next request."""
    rows: list[list[float]] = [[1, 2, 3, 4], [0.5, 0.25, 0.125, 8]]
    body = predict_body(rows)
    pieces = [body[:7], body[7:20], body[20:]]
    with Wire(server) as wire:
        wire.send(
            b"POST /v1/models/affine:predict HTTP/1.1\r\nHost: inferd\r\nTransfer-Encoding: chunked\r\n"
        )
        wire.send(b"Content-Type: application/json\r\n\r\n")
        for piece in pieces[:2]:
            time.sleep(0.05)
            wire.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        time.sleep(0.05)
        wire.send(b"%X\r\n%s" % (len(pieces[2]), pieces[2][:5]))
        time.sleep(0.05)
        wire.send(pieces[2][5:] + b"\r\n")
        wire.nothing_more(0.05)  # the body has not ended: no answer yet
        wire.send(b"0\r\n\r\n")
        assert_predicted(wire.read_answer(), rows)
        wire.send(STATUS)
        assert_status(wire.read_answer())


def test_a_body_in_many_small_reads_is_answered(server: ServerProcess) -> None:
    """A Content-Length body sent in 8 pieces 0.1 s apart (well within ``--body_timeout_s``) is
    answered once its last byte arrives."""
    rows = [[float(i), float(i + 1), float(i + 2), float(i + 3)] for i in range(8)]
    data = predict(rows)
    step = len(data) // 8 + 1
    pieces = [data[start : start + step] for start in range(0, len(data), step)]
    assert len(pieces) == 8
    with Wire(server) as wire:
        for piece in pieces[:-1]:
            wire.send(piece)
            time.sleep(0.1)
        wire.nothing_more(0.05)  # no answer before the last byte
        wire.send(pieces[-1])
        assert_predicted(wire.read_answer(), rows)


def large_predict() -> tuple[bytes, list[float]]:
    """A predict request of ``LARGE_ROWS`` rows (its bytes, one row)."""
    row = [0.125, 0.25, 0.375, 0.5]
    return predict([row] * LARGE_ROWS), row


def assert_large_answer(answer: Answer, row: list[float]) -> None:
    assert answer.status == 200, answer.body[:300]
    predictions = answer.json()["predictions"]
    assert len(predictions) == LARGE_ROWS
    assert all(p == [x * 2 + 1 for x in row] for p in predictions)


def test_a_body_past_64_kib_is_answered(server: ServerProcess) -> None:
    """A ~1.1 MB predict body written at once (uvicorn stops reading past 64 KiB until the
    application reads) is answered whole (a ~1 MB answer), twice on the same connection."""
    data, row = large_predict()
    assert len(data) > 1_000_000
    with Wire(server) as wire:
        for _ in range(2):
            wire.send(data)
            assert_large_answer(wire.read_answer(), row)
        wire.nothing_more(0.05)


def test_a_body_past_64_kib_sent_slowly_is_answered(server: ServerProcess) -> None:
    """The same ~1.1 MB body sent in 10 pieces 0.05 s apart is answered whole."""
    data, row = large_predict()
    step = len(data) // 10 + 1
    with Wire(server) as wire:
        for start in range(0, len(data), step):
            wire.send(data[start : start + step])
            time.sleep(0.05)
        assert_large_answer(wire.read_answer(), row)
        wire.send(STATUS)
        assert_status(wire.read_answer())


def test_fifty_requests_on_one_kept_alive_connection(server: ServerProcess) -> None:
    """50 requests one after another on one connection are all answered; each answer carries a
    ``date`` (now), no ``server`` header, and no ``connection`` header (the connection stays)."""
    with Wire(server) as wire:
        for i in range(50):
            if i % 2:
                wire.send(STATUS)
                answer = wire.read_answer()
                assert_status(answer)
            else:
                wire.send(predict([[i, i, i, i]]))
                answer = wire.read_answer()
                assert_predicted(answer, [[i, i, i, i]])
            sent = email.utils.parsedate_to_datetime(answer.headers["date"])
            assert abs((sent - datetime.now(UTC)).total_seconds()) < 300, answer.headers["date"]
            assert "server" not in answer.headers
            assert "connection" not in answer.headers
        wire.nothing_more(0.05)


def test_connection_close_from_the_client_is_honoured(server: ServerProcess) -> None:
    """A request with ``Connection: close`` is answered with ``connection: close`` and the
    server closes the connection: a request pipelined behind it is not answered."""
    with Wire(server) as wire:
        wire.send(predict([[1, 2, 3, 4]], "Connection: close") + STATUS)
        answer = wire.read_answer()
        assert_predicted(answer, [[1, 2, 3, 4]])
        assert answer.headers["connection"] == "close"
        wire.closed_by_server()


MALFORMED = {
    "no request line": b"GARBAGE\r\n\r\n",
    "unknown version": b"GET /v1/models/affine HTTP/9.9\r\nHost: inferd\r\n\r\n",
    "header without colon": b"GET /v1/models/affine HTTP/1.1\r\nHost: inferd\r\nBad Header\r\n\r\n",
    "Content-Length and chunked": (
        b"POST /v1/models/affine:predict HTTP/1.1\r\nHost: inferd\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "no Host": b"GET /v1/models/affine HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET /v1/models/affine HTTP/1.1\r\nHost: inferd\r\nHost: other\r\n\r\n",
    "a bad chunk size": (
        b"POST /v1/models/affine:predict HTTP/1.1\r\nHost: inferd\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"ins\r\nZZ\r\n'
    ),
    "two Content-Lengths": (
        b"POST /v1/models/affine:predict HTTP/1.1\r\nHost: inferd\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\n\r\n{}}"
    ),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_request_gets_400_and_the_connection_closes(server: ServerProcess, data: bytes) -> None:
    """Invalid HTTP/1.1 gets 400 with ``connection: close`` and a ``date`` (RFC 9110 6.6.1: every
    4xx has one) and the connection is closed, on a new connection, after an answered request
    on a kept-alive one, and behind a good request in the same write (which is answered
    first); others are served on."""
    with Wire(server) as wire:
        wire.send(data)
        answer = wire.read_answer()
        assert answer.status == 400, answer
        assert answer.headers["connection"] == "close"
        sent = email.utils.parsedate_to_datetime(answer.headers["date"])
        assert abs((sent - datetime.now(UTC)).total_seconds()) < 300, answer.headers["date"]
        wire.closed_by_server()
    with Wire(server) as wire:
        wire.send(STATUS)
        assert_status(wire.read_answer())
        wire.send(data)
        answer = wire.read_answer()
        assert answer.status == 400, answer
        assert answer.headers["connection"] == "close"
        wire.closed_by_server()
    with Wire(server) as wire:  # in the same write as a good request: that one is answered first
        wire.send(STATUS + data)
        assert_status(wire.read_answer())
        answer = wire.read_answer()
        assert answer.status == 400, answer
        assert answer.headers["connection"] == "close"
        wire.closed_by_server()
    with Wire(server) as wire:
        wire.send(predict([[1, 2, 3, 4]]))
        assert_predicted(wire.read_answer(), [[1, 2, 3, 4]])


def gzip_chunked(rows: list[list[float]], codings: str = "gzip, chunked") -> bytes:
    """A predict request whose body is gzip-compressed and then chunked, under
    ``Transfer-Encoding: codings``."""
    body = gzip.compress(predict_body(rows))
    return (
        b"POST /v1/models/affine:predict HTTP/1.1\r\nHost: inferd\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: %s\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (codings.encode(), len(body), body)
    )


@pytest.mark.parametrize(
    "codings",
    [
        "gzip, chunked",
        "GZIP,chunked",
        "identity, chunked",
        "x-custom;p=1 , chunked",
        "gzip\r\nTransfer-Encoding: chunked",
    ],
)
def test_a_transfer_coding_other_than_chunked_gets_501_and_the_close(
    server: ServerProcess, codings: str
) -> None:
    """RFC 9112 6.1: a transfer coding the server does not understand gets 501 (Not Implemented).
    llhttp takes such a body apart at its chunks and would hand on the still-gzipped bytes (a 400
    from the JSON parser); it is refused, naming the header and what is supported, and the
    connection closes (its body is not read); after an answered request, and behind a good request
    in the same write (which is answered first). Others are served on."""
    rows: list[list[float]] = [[1, 2, 3, 4]]
    data = gzip_chunked(rows, codings)

    def refused(answer: Answer) -> None:
        assert answer.status == 501, answer
        assert answer.reason == "Not Implemented"
        assert answer.headers["connection"] == "close"
        message = answer.json()["error"]
        assert message.startswith("Transfer-Encoding: "), message
        assert "only the chunked transfer coding" in message, message
        assert "Content-Encoding" in message, message

    with Wire(server) as wire:
        wire.send(data)
        refused(wire.read_answer())
        wire.closed_by_server()
    with Wire(server) as wire:
        wire.send(STATUS)
        assert_status(wire.read_answer())
        wire.send(STATUS + data)
        assert_status(wire.read_answer())
        refused(wire.read_answer())
        wire.closed_by_server()
    with Wire(server) as wire:  # chunked alone (and an empty list element) is read, as before
        wire.send(
            gzip_chunked(rows, ", chunked").replace(
                b"Content-Type", b"Content-Encoding: gzip\r\nContent-Type"
            )
        )
        assert_predicted(wire.read_answer(), rows)
        wire.send(predict(rows))
        assert_predicted(wire.read_answer(), rows)


def test_a_transfer_coding_list_not_ending_in_chunked_stays_400(server: ServerProcess) -> None:
    """RFC 9112 6.3: a request whose last transfer coding is not chunked has no reliable length:
    400 and close (llhttp's answer), not the 501 of an unsupported coding before chunked."""
    with Wire(server) as wire:
        wire.send(gzip_chunked([[1, 2, 3, 4]], "gzip"))
        answer = wire.read_answer()
        assert answer.status == 400, answer
        assert answer.headers["connection"] == "close"
        wire.closed_by_server()


def test_a_body_malformed_in_a_later_read_gets_400_at_once(server: ServerProcess) -> None:
    """A chunked body whose bad chunk size comes in a later read than its head gets 400 and the
    close at once, not the 408 of ``--body_timeout_s`` (5 s here)."""
    with Wire(server) as wire:
        wire.send(
            b"POST /v1/models/affine:predict HTTP/1.1\r\nHost: inferd\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"ins\r\n'
        )
        time.sleep(0.2)
        sent = time.monotonic()
        wire.send(b"ZZ\r\n")
        answer = wire.read_answer()
        assert answer.status == 400, answer
        assert time.monotonic() - sent < 2
        wire.closed_by_server()


def test_a_percent_encoded_path_is_decoded(server: ServerProcess) -> None:
    """``%XX`` in the path is decoded before routing: ``my%5Fmodel`` is model ``my_model`` (x * 3)
    and ``aff%69ne`` is ``affine``."""
    with Wire(server) as wire:
        wire.send(request("GET", "/v1/models/my%5Fmodel"))
        status = wire.read_answer()
        assert status.status == 200, status
        assert status.json()["model_version_status"][0]["state"] == "AVAILABLE"
        wire.send(predict([[1, 2, 3, 4]], path="/v1/models/my%5Fmodel:predict"))
        assert_predicted(wire.read_answer(), [[1, 2, 3, 4]], scale=3.0, offset=0.0)
        wire.send(predict([[1, 2, 3, 4]], path="/v1/models/aff%69ne:predict"))
        assert_predicted(wire.read_answer(), [[1, 2, 3, 4]])


def test_a_query_string_is_accepted(server: ServerProcess) -> None:
    """A query string on a predict, a model status and a V2 metadata URL changes nothing."""
    with Wire(server) as wire:
        wire.send(predict([[1, 2, 3, 4]], path="/v1/models/affine:predict?x=1&y=%20"))
        assert_predicted(wire.read_answer(), [[1, 2, 3, 4]])
        wire.send(request("GET", "/v1/models/affine?x=1"))
        assert_status(wire.read_answer())
        wire.send(request("GET", "/v2/models/affine?x=1"))
        metadata = wire.read_answer()
        assert metadata.status == 200, metadata
        assert metadata.json()["name"] == "affine"


def test_the_header_limit_counts_the_target_and_header_fields_of_a_head_read_at_once(
    tmp_path: Path,
) -> None:
    """With ``--max_header_bytes=400``, a head of exactly 400 bytes of request target and header
    names and values is answered, and one of 401 gets the JSON 413 naming its size and the flag,
    on a connection that then serves another request. Each head comes in one read, so it is
    counted as it is parsed, not as reads arrive."""
    write_onnx_affine(tmp_path / "models" / "affine" / "1", scale=2.0, offset=1.0)
    limited = launch(tmp_path, str(tmp_path / "models"), "--max_header_bytes=400")
    try:
        fixed = len("/v1/models/affine") + len("host") + len("inferd") + len("x-padding")
        with Wire(limited) as wire:
            wire.send(request("GET", "/v1/models/affine", None, "X-Padding: " + "a" * (400 - fixed)))
            assert_status(wire.read_answer())
            wire.send(request("GET", "/v1/models/affine", None, "X-Padding: " + "a" * (401 - fixed)))
            refused = wire.read_answer()
            assert refused.status == 413, refused
            assert "take 401 bytes" in refused.json()["error"]
            assert "--max_header_bytes" in refused.json()["error"]
            wire.send(STATUS)
            assert_status(wire.read_answer())
    finally:
        limited.stop()


def chunked_predict(rows: list[list[float]], trailer: str) -> bytes:
    """A predict request of ``rows`` for ``affine`` with a chunked body and one trailer field."""
    body = predict_body(rows)
    head = request("POST", "/v1/models/affine:predict", None, "Transfer-Encoding: chunked")
    return head + b"%x\r\n%s\r\n0\r\n%s\r\n\r\n" % (len(body), body, trailer.encode())


def send_head_first(wire: Wire, data: bytes, split: bool) -> None:
    """Send the request ``data``; with ``split``, its head alone first and the rest 0.2 s later."""
    if split:
        head, _, rest = data.partition(b"\r\n\r\n")
        wire.send(head + b"\r\n\r\n")
        time.sleep(0.2)
        data = rest
    wire.send(data)


def test_trailer_fields_count_toward_the_header_limit(tmp_path: Path) -> None:
    """With ``--max_header_bytes=400``, a chunked request's trailer field is accepted within the
    limit; one that takes the head past it gets the JSON 413 and the connection closes, whether
    it comes in the read that brought the head or later (test_hostile_connections streams one
    without end)."""
    write_onnx_affine(tmp_path / "models" / "affine" / "1", scale=2.0, offset=1.0)
    limited = launch(tmp_path, str(tmp_path / "models"), "--max_header_bytes=400")
    try:
        with Wire(limited) as wire:
            wire.send(chunked_predict([[1, 2, 3, 4]], "X-Checksum: " + "a" * 100))
            assert_predicted(wire.read_answer(), [[1, 2, 3, 4]])
        # 30 short fields: 389 bytes as counted (target, names, values), 450 on the wire, in
        # small writes, so that no read holds a field whole and the exact count decides
        fields = "\r\n".join(f"X-T{i:02d}: vvvvvv" for i in range(30))
        with Wire(limited) as wire:
            data = chunked_predict([[1, 2, 3, 4]], fields)
            head, _, rest = data.partition(b"\r\n0\r\n")
            wire.send(head + b"\r\n0\r\n")
            for start in range(0, len(rest), 50):
                time.sleep(0.01)
                wire.send(rest[start : start + 50])
            assert_predicted(wire.read_answer(), [[1, 2, 3, 4]])
        for split in (False, True):
            with Wire(limited) as wire:
                # split: the head alone first, answered only once the whole body is read
                send_head_first(wire, chunked_predict([[1, 2, 3, 4]], "X-Checksum: " + "a" * 1_000), split)
                refused = wire.read_answer()
                assert refused.status == 413, refused
                assert "--max_header_bytes" in refused.json()["error"]
                wire.closed_by_server()
    finally:
        limited.stop()


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "head-first"])
def test_trailer_fields_are_not_taken_for_headers(server: ServerProcess, split: bool) -> None:
    """A trailer field is not merged into the request's headers (RFC 9110 6.5.1): a JSON body
    followed by a ``Content-Encoding: gzip`` trailer is read as JSON, whether the whole request
    came in one read or its head first (before, in one read the body was taken for gzip: 400)."""
    with Wire(server) as wire:
        send_head_first(wire, chunked_predict([[1, 2, 3, 4]], "Content-Encoding: gzip"), split)
        assert_predicted(wire.read_answer(), [[1, 2, 3, 4]])


def reset(wire: Wire) -> None:
    """Close with a TCP reset (SO_LINGER 0) instead of a FIN."""
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wire.sock.close()


def test_clients_that_hang_up_mid_body_disturb_no_one(server: ServerProcess) -> None:
    """Clients that close or reset their connection part-way through a Content-Length body, a
    chunked body, a body past 64 KiB, or a head, leave a kept-alive client's connection and new
    ones served, nothing in flight, and no error in the log."""
    large, _ = large_predict()
    partial = {
        "Content-Length body": predict([[1, 2, 3, 4]])[:-10],
        "chunked body": b"POST /v1/models/affine:predict HTTP/1.1\r\nHost: inferd\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n10\r\n{"instan',
        "body past 64 KiB": large[: len(large) // 3],
        "head": b"POST /v1/models/affine:predict HTTP/1.1\r\nHost: inf",
    }
    log_lines = len(server.log().splitlines())
    with Wire(server) as keeper:
        keeper.send(STATUS)
        assert_status(keeper.read_answer())
        for by_reset in (False, True):
            for data in partial.values():
                wire = Wire(server)
                wire.send(data)
                time.sleep(0.05)  # the server has read what was sent
                if by_reset:
                    reset(wire)
                else:
                    wire.sock.close()
            keeper.send(predict([[1, 2, 3, 4]]))
            assert_predicted(keeper.read_answer(), [[1, 2, 3, 4]])
    with Wire(server) as wire:
        wire.send(predict([[4, 3, 2, 1]]))
        assert_predicted(wire.read_answer(), [[4, 3, 2, 1]])

    def nothing_in_flight() -> bool:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as metrics:
            return "inferd_in_flight_requests 0" in metrics.read().decode()

    server.wait_for(nothing_in_flight, "no request in flight")
    log = server.log().splitlines()[log_lines:]
    assert not [line for line in log if "Traceback" in line or " ERROR " in line], log


GATED = """
def load(self):
    pass

def predict(self, inputs):
    import os, time
    deadline = time.monotonic() + 30
    while not os.path.exists({gate!r}) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {{"y": inputs["x"] * 2}}
"""
"""A model whose predict waits for the file ``gate`` to exist (at most 30 s)."""


def test_sigterm_closes_idle_connections_at_once_and_busy_ones_once_answered(tmp_path: Path) -> None:
    """SIGTERM with a request in flight, an idle kept-alive connection, one that never sent a
    byte and one half-way through a request head: the idle two are closed at once (kept-alive
    connections would stay open 30 s), so that clients take their next requests elsewhere; the
    head's request, once whole, gets 503 + ``retry-after: 1`` and ``connection: close``, and so
    does a new connection's; the request in flight gets its 200, whole, with ``connection:
    close``, and the server exits 0."""
    gate = tmp_path / "gate"
    write_python_model(tmp_path / "models" / "slow" / "1", GATED.format(gate=str(gate)))
    (tmp_path / "models" / "slow" / "inferd.toml").write_text("warmup = false\n")
    server = launch(tmp_path, str(tmp_path / "models"), "--keep_alive_timeout_s=30", "--drain_timeout_s=30")
    slow = request("POST", "/v1/models/slow:predict", b'{"instances": [[1, 2]]}')
    try:
        with Wire(server) as idle, Wire(server) as silent, Wire(server) as busy, Wire(server) as heading:
            idle.send(request("GET", "/v2/health/live"))
            assert idle.read_answer().json() == {"live": True}
            busy.send(slow)
            half = len(slow) // 3  # a head on its way at the signal
            heading.send(slow[:half])

            def in_flight() -> bool:
                with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as metrics:
                    return "inferd_in_flight_requests 1" in metrics.read().decode()

            server.wait_for(in_flight, "the slow request to be in flight")
            server.process.send_signal(signal.SIGTERM)
            idle.closed_by_server(within_s=5)
            silent.closed_by_server(within_s=5)
            heading.send(slow[half:])  # answered, then closed
            refused = heading.read_answer()
            assert (refused.status, refused.headers["connection"]) == (503, "close"), refused
            heading.closed_by_server(within_s=5)
            with Wire(server) as late:
                late.send(slow)
                refused = late.read_answer()
                assert refused.status == 503, refused
                assert refused.headers["retry-after"] == "1"
                assert refused.headers["connection"] == "close"
                assert "shutting down" in refused.json()["error"]
                late.closed_by_server(within_s=5)
            busy.nothing_more(0.1)  # still computing
            assert server.process.poll() is None
            gate.write_text("")
            answer = busy.read_answer()
            assert answer.status == 200, answer
            assert answer.headers["connection"] == "close"
            assert answer.json() == {"predictions": [[2.0, 4.0]]}
            busy.closed_by_server(within_s=5)
            assert server.process.wait(timeout=15) == 0
    finally:
        gate.write_text("")
        server.stop()
    assert "Traceback" not in server.log()


def test_the_keep_alive_timeout_runs_from_the_last_answer(tmp_path: Path) -> None:
    """With ``--keep_alive_timeout_s=1``, a connection that sends a request every 0.4 s stays
    open past the timeout (the idle time restarts at each answer, also when the timer set after
    an earlier answer fires meanwhile), then closes about 1 s after its last answer; blank lines
    sent after an answer do not keep it open."""
    write_onnx_affine(tmp_path / "models" / "affine" / "1", scale=2.0, offset=1.0)
    server = launch(tmp_path, str(tmp_path / "models"), "--keep_alive_timeout_s=1")
    try:
        with Wire(server) as wire:
            for _ in range(7):  # 2.8 s: the first answer's timer fires twice on a busy connection
                wire.send(request("GET", "/v2/health/live"))
                assert wire.read_answer().json() == {"live": True}
                last = time.monotonic()
                time.sleep(0.4)
            wire.closed_by_server(within_s=3)
            idle_s = time.monotonic() - last
            assert 0.9 < idle_s < 2.5, idle_s
        with Wire(server) as wire:  # blank lines are no request: the idle time still runs
            wire.send(request("GET", "/v2/health/live"))
            assert wire.read_answer().json() == {"live": True}
            last = time.monotonic()
            for _ in range(4):
                time.sleep(0.3)
                wire.send(b"\r\n")
            wire.closed_by_server(within_s=3)
            idle_s = time.monotonic() - last
            assert 0.9 < idle_s < 2.5, idle_s
    finally:
        server.stop()


SLOW = """
def load(self):
    pass

def predict(self, inputs):
    import time
    time.sleep(float(inputs["x"][0, 0]))
    return {"y": inputs["x"] * 2}
"""
"""A model that sleeps its first input's first value, in seconds."""


def slow_predict(seconds: float) -> bytes:
    return predict([[seconds, 0]], path="/v1/models/slow:predict")


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The ``slow`` model, ``--max_header_bytes=400`` and ``--header_timeout_s=1``."""
    root = tmp_path_factory.mktemp("slow")
    write_python_model(root / "models" / "slow" / "1", SLOW)
    process = launch(root, str(root / "models"), "--max_header_bytes=400", "--header_timeout_s=1")
    yield process
    process.stop()


def test_a_head_too_large_behind_a_running_request_is_refused_after_its_answer(
    slow_server: ServerProcess,
) -> None:
    """A head that grows past ``--max_header_bytes`` while the request before it on the
    connection runs gets its 413 after that request's own answer (it took that answer's place,
    and the request was cancelled)."""
    with Wire(slow_server) as wire:
        wire.send(slow_predict(0.8))
        time.sleep(0.1)
        wire.send(b"GET /v1/models/slow HTTP/1.1\r\nHost: inferd\r\nX-Padding: ")
        for _ in range(3):
            time.sleep(0.05)
            wire.send(b"a" * 200)
        answer = wire.read_answer()
        assert answer.status == 200, answer
        assert answer.json() == {"predictions": [[1.6, 0.0]]}
        refused = wire.read_answer()
        assert refused.status == 413, refused
        assert "--max_header_bytes" in refused.json()["error"]
        wire.closed_by_server()


def test_a_head_the_server_has_not_read_is_not_timed_out(slow_server: ServerProcess) -> None:
    """Behind a request that runs 2 s and one sent after it (the server then stops reading), a
    third request's head, its end sent 50 ms after its start, is answered: the 1 s
    ``--header_timeout_s`` does not count the time the server did not read (it answered 408 in
    the first answer's place)."""
    with Wire(slow_server) as wire:
        third = request("GET", "/v1/models/slow")
        wire.send(slow_predict(2.0))
        time.sleep(0.2)
        wire.send(slow_predict(0.0) + third[:20])
        time.sleep(0.05)
        wire.send(third[20:])
        assert wire.read_answer().json() == {"predictions": [[4.0, 0.0]]}
        assert wire.read_answer().json() == {"predictions": [[0.0, 0.0]]}
        status = wire.read_answer()
        assert status.status == 200, status
        assert status.json()["model_version_status"][0]["state"] == "AVAILABLE"


def test_a_connection_may_send_at_most_64_requests_ahead(server: ServerProcess) -> None:
    """100 requests in one write: the first and the 64 read ahead of their turn are answered, in
    order; the next gets 503 naming the bound, and the connection closes (one read of small
    requests held thousands, and each answer let one more read in: memory without bound)."""
    with Wire(server) as wire:
        wire.send(request("GET", "/v2/health/live") * 100)
        for _ in range(65):
            assert wire.read_answer().json() == {"live": True}
        refused = wire.read_answer()
        assert refused.status == 503, refused
        assert "64 requests waiting" in refused.json()["error"]
        wire.closed_by_server()
        with Wire(server) as other:  # then read as they are answered: all of them
            for _ in range(3):
                other.send(request("GET", "/v2/health/live") * 40)
                for _ in range(40):
                    assert other.read_answer().json() == {"live": True}


UPGRADE = ("Connection: Upgrade", "Upgrade: h2c")


def test_a_request_asking_for_an_upgrade_is_answered_as_plain_http_then_closed(server: ServerProcess) -> None:
    """inferd upgrades no connection: a GET with an Upgrade header is answered as plain HTTP with
    ``connection: close``, and nothing written after it is read as a request; a POST with a
    body and an Upgrade header gets 400 naming the header, also when the body comes in a later
    read (it held a whole request, which was answered as a second one)."""
    with Wire(server) as wire:
        wire.send(request("GET", "/v1/models/affine", None, *UPGRADE) + STATUS)
        answer = wire.read_answer()
        assert_status(answer)
        assert answer.headers["connection"] == "close"
        wire.closed_by_server()
    smuggled = STATUS
    for split in (False, True):
        with Wire(server) as wire:
            send_head_first(wire, request("POST", "/v1/models/affine:predict", smuggled, *UPGRADE), split)
            refused = wire.read_answer()
            assert refused.status == 400, refused
            assert "Upgrade header" in refused.json()["error"]
            wire.closed_by_server()


BIG = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": np.zeros((len(inputs["x"]), 1_000_000), np.float32)}
"""
"""A model whose answer to one row is a million zeros (about 4 MB of JSON)."""

BIG_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1000000]}]}'
)


def test_a_client_that_reads_its_answers_slowly_gets_them_whole(tmp_path: Path) -> None:
    """A client that reads three 4 MB answers steadily, but for longer than ``--body_timeout_s``
    (0.5 s here) with the server's send buffer full, gets them whole: the timeout is for a
    client that reads none (before, the connection was reset 0.5 s after the buffer filled,
    whatever the client read)."""
    write_python_model(tmp_path / "models" / "big" / "1", BIG, BIG_SIGNATURE)
    server = launch(tmp_path, str(tmp_path / "models"), "--body_timeout_s=0.5")
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a small window
            sock.connect((host, int(port)))
            big = predict([[1, 2]], path="/v1/models/big:predict")
            sock.sendall(big * 2 + predict([[1, 2]], "Connection: close", path="/v1/models/big:predict"))
            data = bytearray()
            sock.settimeout(RECV_TIMEOUT_S)
            while chunk := sock.recv(65536):  # at most 8 MB/s
                data += chunk
                time.sleep(0.008)
        answers = bytes(data).split(b"HTTP/1.1 ")[1:]
        assert [answer[:6] for answer in answers] == [b"200 OK"] * 3, data[:300]
        for answer in answers:
            body = answer.partition(b"\r\n\r\n")[2]
            assert len(json.loads(body)["predictions"][0]) == 1_000_000
    finally:
        server.stop()


def test_a_client_that_reads_none_of_its_answers_is_disconnected(tmp_path: Path) -> None:
    """A client that asks for large answers and reads none is disconnected once the server's
    send buffer has stayed full ``--body_timeout_s`` (1 s): its connection, and the answers
    held for it, do not stay for good (the idle keep-alive timeout, 30 s here, never starts)."""
    write_python_model(tmp_path / "models" / "big" / "1", BIG, BIG_SIGNATURE)
    server = launch(tmp_path, str(tmp_path / "models"), "--body_timeout_s=1", "--keep_alive_timeout_s=30")
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
            sock.connect((host, int(port)))
            sock.sendall(predict([[1, 2]], path="/v1/models/big:predict") * 4)
            time.sleep(4)
            received, closed = 0, False
            sock.settimeout(RECV_TIMEOUT_S)
            while not closed:
                try:
                    chunk = sock.recv(1 << 20)
                except ConnectionResetError:
                    chunk = b""
                except TimeoutError:
                    pytest.fail(f"the connection stayed open; {received} bytes read")
                received += len(chunk)
                closed = not chunk
        assert received < 12_000_000, received  # the last answers were never sent
    finally:
        server.stop()
