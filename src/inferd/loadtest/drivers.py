"""The load itself: HTTP/1.1 over raw asyncio connections, or gRPC, in a closed or open loop.

Closed loop: ``level`` connections (HTTP) or callers (gRPC) each send the next request as soon as
the previous answer arrives. Open loop: requests are due at fixed times, ``level`` per second,
whatever the server does; a request that finds no free connection opens one (up to
``max_connections``) or waits in a backlog, and its latency counts from when it was due, so a
slow server cannot hide its latency by slowing the sender down (no coordinated omission).

A request counts in the figures when it was due inside the measured window (after warm-up).
A request not answered within ``timeout_s`` of being sent is an error, in the window or after it:
``timeout`` over HTTP (its connection is closed), the call's ``DEADLINE_EXCEEDED`` over gRPC. When the
window closes, nothing new is sent and answers still outstanding are awaited, so that every
request sent is accounted for in ``all_statuses``, warm-up included. The first few distinct
error messages (the server's own, from an HTTP error body's ``error`` field or a gRPC status's
details) are kept with their status.

The HTTP client is a callback-driven ``asyncio.Protocol`` that sends pre-encoded bytes and parses
only the status line and the body's length (``Content-Length`` or a chunked body's end), on
keep-alive connections: little Python per request, so that the generator is rarely the bottleneck.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import orjson

from inferd.loadtest.payloads import Payload

CLOSED, OPEN = "closed", "open"

MAX_MESSAGES = 5
"""Distinct error messages kept per step (the first ones seen)."""

MAX_MESSAGE_CHARS = 500


@dataclass(slots=True)
class Samples:
    """Latencies (ns) of the successful requests due in the window, the statuses of all of them,
    ``all_statuses``: every request sent, warm-up included, ``messages``: the first distinct
    error messages, as ``"STATUS: message"``, when the first and the last of those successful
    requests were answered (``time.monotonic_ns``; 0 when none was), and, open loop, how late the
    generator sent each request due in the window (``send_lags_ns``: its own delay, before any
    wait for a connection or the server)."""

    latencies_ns: np.ndarray
    statuses: dict[str, int]
    all_statuses: dict[str, int]
    messages: list[str] = field(default_factory=list)
    first_done_ns: int = 0
    last_done_ns: int = 0
    send_lags_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @staticmethod
    def merge(parts: list[Samples]) -> Samples:
        statuses: collections.Counter[str] = collections.Counter()
        every: collections.Counter[str] = collections.Counter()
        messages: dict[str, None] = {}
        for part in parts:
            statuses.update(part.statuses)
            every.update(part.all_statuses)
            messages.update(dict.fromkeys(part.messages))
        latencies = np.concatenate([p.latencies_ns for p in parts]) if parts else np.zeros(0, np.int64)
        answered = [p for p in parts if p.last_done_ns]
        return Samples(
            latencies,
            dict(statuses),
            dict(every),
            list(messages)[:MAX_MESSAGES],
            min((p.first_done_ns for p in answered), default=0),
            max((p.last_done_ns for p in answered), default=0),
            np.concatenate([p.send_lags_ns for p in parts]) if parts else np.zeros(0, np.int64),
        )


def succeeded(status: str) -> bool:
    """An HTTP 2xx status or gRPC's OK."""
    return status == "OK" or (len(status) == 3 and status[0] == "2")


@dataclass(slots=True)
class _Recorder:
    window_start_ns: int
    window_end_ns: int
    latencies: list[int] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    every: collections.Counter[str] = field(default_factory=collections.Counter)
    messages: dict[str, None] = field(default_factory=dict)
    first_done_ns: int = 0
    last_done_ns: int = 0
    lags: list[int] = field(default_factory=list)

    def record(self, due_ns: int, done_ns: int, status: str) -> None:
        self.every[status] += 1
        if self.window_start_ns <= due_ns < self.window_end_ns:
            self.statuses[status] += 1
            if succeeded(status):
                self.latencies.append(done_ns - due_ns)
                self.first_done_ns = self.first_done_ns or done_ns
                self.last_done_ns = max(self.last_done_ns, done_ns)

    def sent(self, due_ns: int, lag_ns: int) -> None:
        """Note that the generator sent the request due at ``due_ns`` ``lag_ns`` late."""
        if self.window_start_ns <= due_ns < self.window_end_ns:
            self.lags.append(lag_ns)

    @property
    def wants_messages(self) -> bool:
        return len(self.messages) < MAX_MESSAGES

    def note(self, status: str, message: str) -> None:
        """Keep ``message`` (why a request got ``status``) if it is new and there is room."""
        if self.wants_messages:
            text = " ".join(message.split())[:MAX_MESSAGE_CHARS] or "(no message)"
            self.messages.setdefault(f"{status}: {text}", None)

    def samples(self) -> Samples:
        return Samples(
            np.asarray(self.latencies, dtype=np.int64),
            dict(self.statuses),
            dict(self.every),
            list(self.messages),
            self.first_done_ns,
            self.last_done_ns,
            np.asarray(self.lags, dtype=np.int64),
        )


def error_text(body: bytes) -> str:
    """The message of an HTTP error body: its JSON ``error`` field (both REST dialects) or the
    body as text."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return str(document["error"])
    return body.decode("utf-8", "replace")


def measure(
    payload: Payload,
    mode: str,
    level: float,
    start_ns: int,
    warmup_s: float,
    duration_s: float,
    timeout_s: float = 10.0,
    max_connections: int = 1024,
    *,
    phase_ns: int = 0,
) -> Samples:
    """Run one step from ``start_ns`` (``time.monotonic_ns``): warm-up, then the measured window.

    ``level`` is the concurrency (closed loop) or the rate in requests/s (open loop). An open
    loop's first request falls due ``phase_ns`` after ``start_ns`` (the window does not move),
    so that the processes of one step can take turns on one schedule.
    """
    try:
        import uvloop

        runner: Callable[..., Samples] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency where it installs
        runner = asyncio.run
    window_start = start_ns + int(warmup_s * 1e9)
    recorder = _Recorder(window_start, window_start + int(duration_s * 1e9))
    driver = _Grpc if payload.is_grpc else _Http
    load = driver(payload, recorder, timeout_s, max_connections)
    return runner(load.run(mode, level, start_ns, start_ns + phase_ns))


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; at most one request outstanding."""

    __slots__ = (
        "_body_at",
        "_chunked",
        "_driver",
        "_expect",
        "_status",
        "_write",
        "buffer",
        "due_ns",
        "error_body",
        "sent_ns",
        "transport",
    )

    def __init__(self, driver: _Http) -> None:
        self._driver = driver
        self.transport: asyncio.BaseTransport | None = None
        self._write: Callable[[bytes], object] = _unconnected
        self.buffer = bytearray()
        self.due_ns = 0
        self.sent_ns = 0
        self._expect = -1
        self._chunked = -1
        self._body_at = 0
        self._status = ""
        self.error_body = b""
        """The body of the last answer, when its status was not 2xx."""

    @property
    def reused(self) -> bool:
        """Whether an answer came back on this connection: a request now goes out on a kept-alive one."""
        return bool(self._status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they write.
        self.transport = transport
        self._write = cast(asyncio.WriteTransport, transport).write

    def send(self, due_ns: int) -> None:
        self.due_ns = due_ns
        self.sent_ns = time.monotonic_ns()
        self._write(self._driver.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while buffer:
            if self._expect < 0 and not self._head(buffer):
                return
            if self._chunked >= 0:
                end = buffer.find(b"0\r\n\r\n", self._chunked)
                while end > self._chunked and buffer[end - 2 : end] != b"\r\n":
                    end = buffer.find(b"0\r\n\r\n", end + 1)
                if end < 0:
                    self._chunked = max(self._chunked, len(buffer) - 6)
                    return
                self._expect, self._chunked = end + 5, -1
            if len(buffer) < self._expect:
                return
            if self._status[:1] != "2":
                self.error_body = bytes(buffer[self._body_at : self._expect])
            del buffer[: self._expect]
            self._expect = -1
            self._driver.answered(self, self._status)

    def _head(self, buffer: bytearray) -> bool:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buffer[:end]).lower()
        self._status = head[9:12].decode()
        self._body_at = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            line_end = head.find(b"\r\n", at + 2)
            self._expect = end + 4 + int(head[at + 17 : line_end if line_end > 0 else len(head)])
        elif b"chunked" in head:
            self._expect, self._chunked = end + 4, end + 4
        else:
            self._expect = end + 4
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._write = _unconnected
        self._driver.lost(self)


def _unconnected(data: bytes) -> None:
    raise ConnectionError("the connection is closed")


class _Http:
    """The HTTP load: a pool of connections fed by a closed or an open loop."""

    def __init__(self, payload: Payload, recorder: _Recorder, timeout_s: float, max_connections: int) -> None:
        self.request = payload.request
        self._payload = payload
        self._ssl = payload.tls.ssl_context() if payload.tls else None
        self._recorder = recorder
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._closed_loop = False
        self._sending = True
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._backlog: collections.deque[int] = collections.deque()
        self._opening = 0
        self._settled = asyncio.Event()

    async def run(self, mode: str, level: float, start_ns: int, first_due_ns: int) -> Samples:
        await _sleep_until(start_ns)
        end_ns = self._recorder.window_end_ns
        expiry = asyncio.get_running_loop().create_task(self._expire())
        if mode == CLOSED:
            self._closed_loop = True
            for _ in range(int(level)):
                self._backlog.append(time.monotonic_ns())
                self._open()
            await _sleep_until(end_ns)
        else:
            await _schedule(level, first_due_ns, end_ns, self._dispatch, self._recorder)
        # Stop sending new requests; an open loop's backlog (due in the window) still goes out.
        self._sending = False
        self._check_settled()
        try:
            await asyncio.wait_for(self._settled.wait(), self._timeout_s)
        except TimeoutError:
            now = time.monotonic_ns()
            for due_ns in [*(c.due_ns for c in self._busy), *self._backlog]:
                self._recorder.record(due_ns, now, "timeout")
                self._recorder.note("timeout", f"no answer within {self._timeout_s:g} s (--timeout)")
        expiry.cancel()
        for connection in [*self._idle, *self._busy]:
            if connection.transport is not None:
                connection.transport.close()
        return self._recorder.samples()

    async def _expire(self) -> None:
        """Every so often, count each request unanswered ``timeout_s`` after it was sent as a
        ``timeout`` and close its connection (HTTP/1.1 cannot cancel a request otherwise)."""
        timeout_ns = int(self._timeout_s * 1e9)
        while True:
            await asyncio.sleep(min(0.1, self._timeout_s / 10))
            now = time.monotonic_ns()
            for connection in [c for c in self._busy if now - c.sent_ns > timeout_ns]:
                self._busy.discard(connection)  # so that losing it is not an error of its own
                self._recorder.record(connection.due_ns, now, "timeout")
                self._recorder.note("timeout", f"no answer within {self._timeout_s:g} s (--timeout)")
                if connection.transport is not None:
                    connection.transport.close()
                if self._closed_loop and self._sending:
                    self._backlog.append(now)
                    self._open()
            self._check_settled()

    def _dispatch(self, due_ns: int) -> None:
        if self._idle:
            connection = self._idle.pop()
            self._busy.add(connection)
            connection.send(due_ns)
            return
        self._backlog.append(due_ns)
        if len(self._busy) + self._opening < self._max_connections:
            self._open()

    def _open(self) -> None:
        self._opening += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        opening = loop.create_connection(
            lambda: _Connection(self), self._payload.host, self._payload.port, ssl=self._ssl
        )
        try:  # a server that never completes the handshake is a connect_error, not a silent stall
            _, connection = await asyncio.wait_for(opening, self._timeout_s)
        except OSError as exc:  # TimeoutError included
            if self._backlog:
                self._recorder.record(self._backlog.popleft(), time.monotonic_ns(), "connect_error")
                self._recorder.note(
                    "connect_error",
                    f"no connection within {self._timeout_s:g} s (--timeout)"
                    if isinstance(exc, TimeoutError)
                    else str(exc),
                )
            await asyncio.sleep(0.01)  # the server is not there: do not spin
            self._opening -= 1
            if self._closed_loop and self._sending:
                self._backlog.append(time.monotonic_ns())
                self._open()
            self._check_settled()
            return
        self._opening -= 1
        self._next(connection)

    def answered(self, connection: _Connection, status: str) -> None:
        now = time.monotonic_ns()
        self._recorder.record(connection.due_ns, now, status)
        if status[:1] != "2" and self._recorder.wants_messages:
            self._recorder.note(status, error_text(connection.error_body))
        if self._closed_loop and self._sending:
            connection.send(now)
        else:
            self._next(connection)

    def _next(self, connection: _Connection) -> None:
        if self._backlog:
            self._busy.add(connection)
            connection.send(self._backlog.popleft())
        else:
            self._busy.discard(connection)
            self._idle.append(connection)
            self._check_settled()

    def lost(self, connection: _Connection) -> None:
        if connection in self._busy and connection.reused and not connection.buffer:
            # The server closed a kept-alive connection as the request went out (an idle timeout
            # racing the send): no answer began, so send it again on a fresh connection, as HTTP
            # clients do. Its latency still counts from when it was due.
            self._busy.discard(connection)
            self._backlog.appendleft(connection.due_ns)
            self._open()
        elif connection in self._busy:
            self._busy.discard(connection)
            self._recorder.record(connection.due_ns, time.monotonic_ns(), "connection_error")
            self._recorder.note("connection_error", "the server closed the connection before answering")
            if self._closed_loop and self._sending:
                self._backlog.append(time.monotonic_ns())
                self._open()
        if connection in self._idle:
            self._idle.remove(connection)
        self._check_settled()

    def _check_settled(self) -> None:
        if not self._sending and not self._busy and not self._opening and not self._backlog:
            self._settled.set()


class _Grpc:
    """The gRPC load: unary calls with the pre-serialized request, on a few channels."""

    def __init__(self, payload: Payload, recorder: _Recorder, timeout_s: float, max_connections: int) -> None:
        self._payload = payload
        self._recorder = recorder
        self._timeout_s = timeout_s
        self._sending = True

    async def run(self, mode: str, level: float, start_ns: int, first_due_ns: int) -> Samples:
        import grpc

        target = f"{self._payload.host}:{self._payload.port}"
        count = max(1, min(8, int(level) // 32 if mode == CLOSED else 1))
        options = [("grpc.use_local_subchannel_pool", 1)]
        tls = self._payload.tls
        channels = [
            grpc.aio.secure_channel(target, tls.grpc_credentials(), options)
            if tls
            else grpc.aio.insecure_channel(target, options=options)
            for _ in range(count)
        ]
        calls: list[Any] = [c.unary_unary(self._payload.path) for c in channels]
        await _sleep_until(start_ns)
        try:
            if mode == CLOSED:
                workers = [
                    asyncio.create_task(self._caller(calls[i % count], channels[i % count]))
                    for i in range(int(level))
                ]
                await _sleep_until(self._recorder.window_end_ns)
                self._sending = False
                await asyncio.wait(workers, timeout=self._timeout_s + 1)  # calls carry the deadline
            else:
                pending: set[asyncio.Task[str]] = set()

                def dispatch(due_ns: int) -> None:
                    task = asyncio.create_task(self._call(calls[0], due_ns))
                    pending.add(task)
                    task.add_done_callback(pending.discard)

                await _schedule(level, first_due_ns, self._recorder.window_end_ns, dispatch, self._recorder)
                if pending:
                    await asyncio.wait(pending, timeout=self._timeout_s + 1)
        finally:
            for channel in channels:
                await channel.close()
        return self._recorder.samples()

    async def _caller(self, call: Any, channel: Any) -> None:
        import grpc

        while self._sending:
            status = await self._call(call, time.monotonic_ns())
            if status == "UNAVAILABLE" and channel.get_state() is not grpc.ChannelConnectivity.READY:
                await asyncio.sleep(0.01)  # the server is not there: do not spin (as over HTTP)

    async def _call(self, call: Any, due_ns: int) -> str:
        """One call due at ``due_ns``, recorded; its status."""
        import grpc

        try:
            await call(self._payload.request, timeout=self._timeout_s, metadata=self._payload.grpc_metadata)
            status = "OK"
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
            self._recorder.note(status, exc.details() or "")
        self._recorder.record(due_ns, time.monotonic_ns(), status)
        return status


async def _sleep_until(when_ns: int) -> None:
    delay = (when_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def _schedule(
    rate: float,
    start_ns: int,
    end_ns: int,
    dispatch: Callable[[int], None],
    recorder: _Recorder | None = None,
) -> None:
    """Call ``dispatch(due_ns)`` for requests due every 1/rate s from ``start_ns`` to ``end_ns``;
    requests that fell due while the loop was busy are dispatched late with their due time, and
    how late each was is noted in ``recorder``."""
    interval = 1e9 / rate
    due = float(start_ns)
    while due < end_ns:
        now = time.monotonic_ns()
        while due <= now and due < end_ns:
            dispatch(int(due))
            if recorder is not None:
                recorder.sent(int(due), time.monotonic_ns() - int(due))
            due += interval
        await asyncio.sleep(max(0.0, (due - time.monotonic_ns()) / 1e9))
