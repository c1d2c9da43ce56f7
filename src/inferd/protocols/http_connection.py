"""The REST port's connections: how many may be open, how long a client may take to send a
request, and how large its head may grow while it is read.

uvicorn's httptools protocol parses HTTP/1.1; ``connection_class`` subclasses it with what a
hostile or broken client must not be able to hold:

- a connection past ``max_connections`` gets ``503`` and is closed at accept, before it is read;
- the request line and headers must arrive within ``header_timeout_s`` of the connection opening
  (or of the first byte of a kept-alive connection's next request): else ``408`` and close
  (a connection that sent nothing is closed without an answer);
- a body must not pause for ``body_timeout_s`` between two reads: else ``408`` and close (the
  time the server itself stops reading, to apply back-pressure, does not count); and a client
  must not leave the answers unread that long (the server's send buffer full, and no byte of
  it read): else the connection closes;
- the head may not grow past ``max_header_bytes`` while it is read: ``413`` and close, so a huge
  header costs at most that plus one socket read (the application checks the exact size of heads
  that arrive whole, counted here as they are parsed: ``RequestWatch.head_bytes``);
- a chunked body's trailer fields count toward the same limit, and one trailer field may not grow
  past it while it is read: ``413`` and close; they are not added to the request's headers;
- a request that asks for a protocol upgrade is answered as the plain HTTP request it also is
  (inferd upgrades no connection), without a log line, and the connection then closes; with a
  body, it gets 400;
- a malformed request, and an HTTP/1.1 one without exactly one Host header, get 400 and close;
  a chunked body under another transfer coding too (``Transfer-Encoding: gzip, chunked``) gets
  501 and close (RFC 9112 6.1): only chunked is decoded, and the body is not read;
  a request target longer than httptools parses (``MAX_TARGET_BYTES``) gets 414 and close;
- at most ``MAX_PIPELINED`` requests may wait behind the one being answered: the next gets 503
  and close. Every refusal above waits for the answers of the requests before it.

Idle kept-alive connections close after uvicorn's ``timeout_keep_alive`` (blank lines do not
count as a request), and at once when the server starts to drain (``LimitedHttpProtocol.drain``).
An answer waits while the client does not read those before it.

Each request's scope carries a ``RequestWatch`` (``scope["extensions"][WATCH]``) through which
the connection cancels the application's work for it when the client hangs up, without a task
per request waiting for the disconnect.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import sys
import weakref
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httptools
import orjson
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from inferd.config import ServerConfig
from inferd.errors import DEADLINE_PASSED, ConfigError

WATCH = "inferd.watch"
"""The scope extension that holds a request's ``RequestWatch``."""

AUTO_CONNECTIONS_CAP = 10_000
"""The most connections ``--max_connections 0`` (auto) allows per port."""

MAX_TARGET_BYTES = 65_535
"""The longest request target httptools parses (``parse_url``); a longer one gets 414."""

MAX_PIPELINED = 64
"""The most requests one connection may have read and waiting behind the one being answered."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one REST connection may hold, each named after its ``inferd serve`` flag.

    Attributes:
        max_connections: open connections on the port; past it new ones get 503 and close.
        header_timeout_s: seconds to send the request line and headers.
        body_timeout_s: seconds a body may go without a byte arriving.
        max_header_bytes: bytes of request line and headers read before the head is refused.
    """

    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError(f"--max_connections must be >= 0 (0: auto), got {self.max_connections}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0 seconds, got {getattr(self, name)}")

    @classmethod
    def of(cls, config: ServerConfig) -> ConnectionLimits:
        """The limits ``config`` sets, ``max_connections`` 0 resolved by ``auto_max_connections``.

        Raises:
            ConfigError: a timeout is not positive, or ``max_connections`` is negative.
        """
        if config.keep_alive_timeout_s <= 0:
            raise ConfigError(
                f"--keep_alive_timeout_s must be > 0 seconds, got {config.keep_alive_timeout_s}"
            )
        connections = config.max_connections or auto_max_connections()
        if config.max_connections < 0:
            connections = config.max_connections
        return cls(connections, config.header_timeout_s, config.body_timeout_s, config.max_header_bytes)


def auto_max_connections() -> int:
    """A quarter of the process's open-file limit (soft), at most ``AUTO_CONNECTIONS_CAP``: the
    REST and the gRPC port together then hold at most half the descriptors, and the rest stay for
    models, logs and the repository scan."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return AUTO_CONNECTIONS_CAP
    return max(1, min(AUTO_CONNECTIONS_CAP, soft // 4))


def raise_open_file_limit() -> int:
    """Raise the process's soft open-file limit to its hard limit, as Go programs and nginx
    (``worker_rlimit_nofile``) do, so that the connection caps are not set by a shell's 1,024
    default; returns the soft limit now in force (unchanged where raising is refused)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_class(limits: ConnectionLimits) -> type[LimitedHttpProtocol]:
    """uvicorn's httptools protocol under ``limits``, a class of its own per server (its
    ``drain`` is the server's); give it to ``uvicorn.Config(http=...)``."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


def _answer(
    status: int, reason: bytes, message: str, defaults: Iterable[tuple[bytes, bytes]], *extra: bytes
) -> bytes:
    """A whole HTTP/1.1 answer with inferd's ``{"error": ...}`` body that closes the connection;
    ``defaults``: uvicorn's header fields for every answer (its ``date``, which RFC 9110 6.6.1
    requires of a 4xx)."""
    body = orjson.dumps({"error": message})
    head = [
        b"HTTP/1.1 %d %s" % (status, reason),
        *(name + b": " + value for name, value in defaults),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        *extra,
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _carries_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request with these header fields has a body: chunked, or a length other than 0."""
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
        for name, value in headers
    )


_BYTES_ACKED = slice(120, 128)
"""Where Linux's ``struct tcp_info`` (``TCP_INFO``, since Linux 4.1) holds ``tcpi_bytes_acked``."""


def _taken(transport: asyncio.Transport) -> int:
    """A count that grows as the client takes what was written to ``transport``: the bytes it
    acknowledged, where the system tells (Linux), else minus the bytes in the transport's
    buffer (which a slow reader may drain only after the socket's megabytes of send queue)."""
    sock = transport.get_extra_info("socket")
    tcp_info = getattr(socket, "TCP_INFO", None)
    if sock is not None and tcp_info is not None:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, _BYTES_ACKED.stop)
        except OSError:
            info = b""
        if len(info) >= _BYTES_ACKED.stop:
            return int.from_bytes(info[_BYTES_ACKED], sys.byteorder)
    return -transport.get_write_buffer_size()


def _no_cycle() -> None:
    """What ``RequestWatch`` holds before the connection made the request's ``Exchange``: none."""
    return None


class RequestWatch:
    """One request's link to its connection. It ends the request's computation early: when the
    client hangs up (``hang_up``, from the connection) or its deadline passes (``expire``, from a
    timer), the task in ``task`` is cancelled and the flag says why. ``task`` is set only while
    the answer is computed (the body was read and nothing is sent yet). ``send_whole`` writes a
    whole answer at once. ``step`` lets the port's other requests catch up. Event loop thread
    only."""

    __slots__ = ("_cycle", "_tasks", "expired", "head_bytes", "hung_up", "task")

    def __init__(self, tasks: Collection[asyncio.Task[Any]] = (), head_bytes: int | None = None) -> None:
        """``tasks``: the port's request tasks (uvicorn's, begun or not; a finished one stays
        until a later turn); ``head_bytes``: the bytes of the request target and of the header
        names and values, counted as the head was parsed (None: not counted)."""
        self.task: asyncio.Task[Any] | None = None
        self.head_bytes = head_bytes
        self._tasks = tasks
        self.hung_up = False
        self.expired = False
        # Gives the request's Exchange (its uvicorn request cycle) once it is made (a weak reference;
        # None before and after). Weak: the cycle holds this
        # watch (in its scope), and a strong link back would leave every request's objects to
        # the cyclic garbage collector, whose full passes paused the loop for 20-30 ms under load.
        self._cycle: Callable[[], Any] = _no_cycle

    @property
    def client_gone(self) -> bool:
        """The connection closed before this request was answered (maybe before ``task`` was set)."""
        cycle = self._cycle()
        return cycle is not None and bool(cycle.disconnected)

    def hang_up(self) -> None:
        if self.task is not None and not self.hung_up and not self.expired:
            self.hung_up = True
            self.task.cancel()

    def expire(self) -> None:
        if self.task is not None and not self.hung_up and not self.expired:
            self.expired = True
            self.task.cancel(DEADLINE_PASSED)

    async def step(self) -> None:
        """With other requests in progress on the port (in this process), wait one turn of the
        event loop, so that those ready to run go first; alone, return at once.

        Under load the loop then takes the requests one read of the sockets brought in steps:
        all of them decoded and computed, then all the answers written back to back. A client
        woken by the first answer finds the others already there, where answers written one at
        a time woke it for each (docs/performance.md, "Requests in steps").
        """
        tasks = self._tasks
        if len(tasks) > 1:
            this = asyncio.current_task()
            if any(task is not this and not task.done() for task in tasks):
                await asyncio.sleep(0)

    def send_whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Write the answer (``headers``: lower-case names, ``content-length`` among them) in one
        write, as uvicorn writes a start and a body message, and end the request; False (nothing
        written) when it cannot: no cycle, an answer started, the client gone, the client not
        reading what was written (uvicorn's ``send`` then waits for it), or a header value holding
        a line break. Saves the second write and the two ASGI messages."""
        cycle = self._cycle()
        if cycle is None or cycle.response_started or cycle.disconnected or cycle.flow.write_paused:
            return False
        parts = [STATUS_LINE[status]]
        for name, value in (*cycle.default_headers, *headers):
            if b"\r" in value or b"\n" in value:
                return False
            parts += (name.lower(), b": ", value, b"\r\n")
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if cycle.scope["method"] != "HEAD":
            parts.append(body)
        cycle.transport.write(b"".join(parts))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()
        return True


class BadRequest(Exception):
    """A request the parser read but HTTP/1.1 forbids; raised in a parser callback, it is
    answered 400 with this message, as the parser's own errors are."""


class FieldsTooLarge(BadRequest):
    """Trailer fields that take a request past ``max_header_bytes``: answered 413."""


class TargetTooLong(BadRequest):
    """A request target longer than ``MAX_TARGET_BYTES``: answered 414 (RFC 9112 3)."""


class TooManyPipelined(BadRequest):
    """A request past ``MAX_PIPELINED`` waiting on its connection: answered 503."""


class UnsupportedCoding(BadRequest):
    """A body under a transfer coding other than chunked: answered 501 (RFC 9112 6.1)."""


def _unsupported_codings(codings: bytes) -> BadRequest | None:
    """Why a request whose Transfer-Encoding values are ``codings`` (each followed by a comma)
    cannot be read, when chunked is their last coding and another comes before it
    (``UnsupportedCoding``), or chunked comes more than once, which no sender may do (RFC 9112
    7.1, a plain ``BadRequest``); else None.

    The parser takes such a body apart at its chunks but hands on what the other coding still
    holds (gzip's bytes, the application's JSON parser then refuses); a list whose last coding is
    not chunked the parser itself refuses with 400 (RFC 9112 6.3), and it is left to do so.
    """
    listed = [item.split(b";")[0].strip().lower() for item in codings.split(b",")]
    listed = [item for item in listed if item]  # empty list elements are allowed (RFC 9110 5.6.1)
    if listed[-1:] != [b"chunked"] or len(listed) == 1:
        return None
    shown = ", ".join(v.strip().decode("latin-1") for v in codings.split(b",") if v.strip())
    if listed.count(b"chunked") > 1:
        return BadRequest(f"Transfer-Encoding: {shown} applies chunked more than once (RFC 9112 7.1)")
    return UnsupportedCoding(
        f"Transfer-Encoding: {shown} is not supported: this server decodes only the chunked "
        "transfer coding (RFC 9112 6.1); send the body with 'Transfer-Encoding: chunked' alone or "
        "a Content-Length, and compress it with 'Content-Encoding: gzip' or 'deflate' instead"
    )


_ASGI = {"version": "3.0", "spec_version": "2.3"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange(RequestResponseCycle):
    """One request and its answer on a connection: uvicorn's request cycle (its ASGI ``send``,
    kept as it is) with a cheaper ``receive``. uvicorn's makes an ``asyncio.Event`` per request,
    copies the body out of a ``bytearray`` and waits on the event even when the whole body came
    with the head; this one hands over the chunks read so far at once and waits (on a future
    made only then) only when there are none yet. Event loop thread only."""

    def __init__(self, scope: Any, protocol: LimitedHttpProtocol, keep_alive: bool) -> None:
        # Not super().__init__(): that is the per-request cost this class saves.
        self.scope = scope
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.logger = protocol.logger
        self.access_logger = protocol.access_logger
        self.access_log = protocol.access_log
        self.default_headers = protocol.server_state.default_headers
        self.on_response = protocol.on_response_complete
        self.resume_reading = protocol.resume_reading
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = protocol.expect_100_continue
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding: bool | None = None
        self.expected_content_length = 0
        self.chunks: list[bytes] = []  # body read and not yet received
        self.buffered = 0  # their bytes
        self._loop = protocol.loop
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False  # the body's last message was received

    @property
    def message_event(self) -> Exchange:  # type: ignore[override]  # uvicorn's code calls .set()
        """This exchange (a property: an attribute would make a reference cycle)."""
        return self

    def set(self) -> None:
        """Something changed (body read, its end, the answer sent, the client gone): wake a
        ``receive`` that waits. uvicorn calls it as ``message_event.set()``."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def receive(self) -> Any:
        """The ASGI receive: the body read so far (``http.request``), then ``http.disconnect``
        once the client has gone or the answer is sent."""
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(_CONTINUE)
            self.waiting_for_100_continue = False
        while not (self.chunks or (not self.more_body and not self._ended)):
            if self.disconnected or self.response_complete:
                break
            self.resume_reading()
            waiter = self._waiter
            if waiter is None or waiter.done():  # else another receive waits: wait with it
                self._waiter = waiter = self._loop.create_future()
            await asyncio.shield(waiter)  # one receive's cancel must not wake the others with it
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        body = b"".join(self.chunks)
        self.chunks = []
        self.buffered = 0
        self.resume_reading()
        self._ended = not self.more_body
        return {"type": "http.request", "body": body, "more_body": self.more_body}


class LimitedHttpProtocol(HttpToolsProtocol):
    """One REST connection under ``limits`` (set by ``connection_class``). Runs on the event loop.

    Besides the limits, it does less per request than uvicorn's protocol (``bench.connection_cost``;
    docs/performance.md, "uvicorn's request cycle"): the scope is made once the head is read,
    requests run on an ``Exchange``, and an idle connection's keep-alive timer is armed once per
    idle spell and checked when it fires, instead of made and cancelled for every request.
    It serves inferd's ``uvicorn.Config``, which sets neither ``limit_concurrency``, WebSockets
    nor lifespan state, and passes none of them on.
    """

    limits: ConnectionLimits
    draining = False
    """Set by ``drain``: every answer from then on closes its connection."""
    cycle: Exchange

    @classmethod
    def drain(cls, connections: Collection[HttpToolsProtocol]) -> None:
        """Close the port's idle connections now, and every other once its answer is sent (with
        ``connection: close``), so that clients take their next requests elsewhere; a connection
        whose request head is on its way counts as busy. Call it on the class
        ``connection_class`` made, with uvicorn's ``server_state.connections``."""
        cls.draining = True
        for connection in list(connections):
            if not (isinstance(connection, LimitedHttpProtocol) and connection._head_begun):
                connection.shutdown()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False  # reads nothing more: over the connection cap, or past a malformed request
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None  # bytes read of the head in progress, None between heads
        self._head_begun = False  # the head in progress has its first byte
        self._head_began_in_read = False  # ... and it came in the read being parsed
        self._in_body = False  # between the end of the head and the end of the request
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_read_at = 0.0
        self._write_timer: asyncio.TimerHandle | None = None  # armed while writing is paused
        self._write_taken = 0  # what the client had taken (``_taken``) when that timer was armed
        self._idle_since: float | None = None  # when the last answer went, with nothing read since
        # the refusal (status, reason, message) owed once the requests before it are answered
        self._invalid: tuple[int, bytes, str] | None = None
        self._running: Exchange | None = None  # the request whose task runs (pipelined ones wait)
        self._hosts = 0  # Host headers of the request being read
        self._codings = b""  # ... its Transfer-Encoding values, each followed by a comma
        self._field_bytes = 0  # ... and the bytes of its header names and values
        # Bytes read after a chunk header with no chunk data since: a last chunk's trailer
        # field not ended yet, which the parser holds until it ends (-1: the chunk header or a
        # field's end came in this read; ended fields are counted exactly, in on_header).
        self._trailer_bytes: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refused = True
            message = (
                f"the server holds {self.limits.max_connections} connections, its limit "
                "(--max_connections); retry"
            )
            defaults = self.server_state.default_headers
            transport.write(_answer(503, b"Service Unavailable", message, defaults, b"retry-after: 1"))
            transport.close()
            return
        self._head_bytes = 0  # the first head's deadline runs from the connection's opening
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._unset_keepalive_if_required()  # uvicorn cancels it only on a clean close
        super().connection_lost(exc)
        for cycle in (self._running, self.cycle):  # the request running, and the last one read
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.set()
                watch: RequestWatch = cycle.scope["extensions"][WATCH]  # type: ignore[assignment]
                watch.hang_up()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._head_began_in_read = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            cause = error.__context__
            if isinstance(cause, FieldsTooLarge):
                self._refuse(413, b"Content Too Large", str(cause), self._being_read())
            elif isinstance(cause, TooManyPipelined):
                self._refuse(503, b"Service Unavailable", str(cause))
            elif isinstance(cause, TargetTooLong):
                self._refuse(414, b"URI Too Long", str(cause))
            elif isinstance(cause, UnsupportedCoding):
                self._refuse(501, b"Not Implemented", str(cause))
            else:
                detail = cause if isinstance(cause, BadRequest) else error
                self.logger.warning("Invalid HTTP request received: %s", detail)  # one template
                message = f"Invalid HTTP request received: {detail}"
                self._refuse(400, b"Bad Request", message, self._being_read())
            return
        except httptools.HttpParserUpgrade:
            # inferd upgrades to nothing (RFC 9110 7.8 lets it answer as plain HTTP), but the
            # parser took the rest of the connection for the other protocol, and skipped the
            # body: nothing more is read, and a request that had a body is refused.
            self._refused = True
            cycle = self.cycle
            if _carries_body(cycle.scope["headers"]):
                message = (
                    "Invalid HTTP request received: a request that asks for a protocol upgrade "
                    "cannot carry a body here (inferd upgrades no connection); send it without "
                    "the Upgrade header"
                )
                self._refuse(400, b"Bad Request", message, cycle)
                return
            cycle.keep_alive = False  # answered as plain HTTP, then closed
        # Timers are armed only for a request that one read did not bring whole, so that the
        # usual small request costs none.
        if self._in_body:
            self._body_read_at = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)
            if self._trailer_bytes is not None:
                self._trailer_bytes = 0 if self._trailer_bytes < 0 else self._trailer_bytes + len(data)
                if self._trailer_bytes > self.limits.max_header_bytes:
                    self._refuse(
                        413,
                        b"Content Too Large",
                        f"the trailer fields take more than {self.limits.max_header_bytes} bytes, "
                        "the limit (--max_header_bytes)",
                        self._being_read(),
                    )
                    return
        if self._head_bytes is None or self.transport.is_closing():
            return
        if self._head_timer is None and self._head_begun:  # the next head on a kept-alive connection
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        if not self._head_began_in_read:  # that read may hold the end of the request before
            self._head_bytes += len(data)
        if self._head_bytes > self.limits.max_header_bytes:
            self._refuse(
                413,
                b"Content Too Large",
                f"the request line and headers take more than {self.limits.max_header_bytes} bytes, "
                f"the limit (--max_header_bytes)",
            )

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._hosts = 0
        self._codings = b""
        self._field_bytes = 0
        if self._head_bytes is None:  # the next request on a kept-alive connection
            self._head_bytes = 0
        self._idle_since = None  # busy (blank lines between requests leave it idle)
        self._head_begun = True
        self._head_began_in_read = True

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing blanks, which RFC 9110 5.5 excludes
        self._field_bytes += len(name) + len(value)
        if self._in_body:  # a trailer field, after a chunked body: counted, and dropped
            # Not merged into the headers (RFC 9110 6.5.1): the application would see it only
            # when the body came in the read that brought the head.
            self._trailer_bytes = -1  # it ended in this read: counted exactly here
            if len(self.url) + self._field_bytes > self.limits.max_header_bytes:
                raise FieldsTooLarge(
                    f"the request line, headers and trailers take more than "
                    f"{self.limits.max_header_bytes} bytes, the limit (--max_header_bytes)"
                )
            return
        if name == b"host":
            self._hosts += 1
        elif name == b"transfer-encoding":
            self._codings += value + b","
        elif name == b"expect" and value.lower() == b"100-continue":
            # An HTTP/1.0 client may not know 1xx answers: its expectation is ignored (RFC 9110 10.1.1).
            self.expect_100_continue = self.parser.get_http_version() != "1.0"
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._head_bytes = None
        self._head_begun = False
        parser = self.parser
        http_version = parser.get_http_version()
        if self._hosts != 1 and http_version == "1.1":  # the parser answers it 400 (data_received)
            raise BadRequest(
                f"An HTTP/1.1 request must have one Host header (RFC 9112 3.2); this one has {self._hosts}."
            )
        if self._codings and (refusal := _unsupported_codings(self._codings)) is not None:
            raise refusal
        if len(self.pipeline) >= MAX_PIPELINED:
            raise TooManyPipelined(
                f"this connection has {MAX_PIPELINED} requests waiting for their answers, the most "
                "it may send ahead; send the rest once those are answered"
            )
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError as error:
            raise self._unread_target(error) from None
        raw_path = url.path or b"/"  # "http://host" in absolute form: the path "/" (RFC 9110 4.2.3)
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        watch = RequestWatch(self.tasks, len(self.url) + self._field_bytes)
        self.scope = {
            "type": "http",
            "asgi": _ASGI,  # type: ignore[typeddict-item]
            "http_version": http_version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "method": parser.get_method().decode("ascii"),
            "root_path": self.root_path,
            "path": self.root_path + path,
            "raw_path": self.root_path.encode("ascii") + raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
            "extensions": {WATCH: watch},  # type: ignore[dict-item]
        }
        previous = self.cycle
        keep_alive = http_version != "1.0" and parser.should_keep_alive() and not self.draining
        self.cycle = cycle = Exchange(self.scope, self, keep_alive)
        watch._cycle = weakref.ref(cycle)
        if previous is None or previous.response_complete:
            self._start(cycle)
        else:  # pipelined: answered in order
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))
        self._in_body = True

    def _unread_target(self, error: Exception) -> BadRequest:
        """Why the request target could not be parsed (``error``): a head past
        ``max_header_bytes`` (413), a target longer than httptools reads (414), or no URL (400)."""
        size = len(self.url) + self._field_bytes
        if size > self.limits.max_header_bytes:
            return FieldsTooLarge(
                f"the request line and headers take {size} bytes, over the limit of "
                f"{self.limits.max_header_bytes} bytes (--max_header_bytes)"
            )
        if len(self.url) > MAX_TARGET_BYTES:
            return TargetTooLong(
                f"the request target takes {len(self.url)} bytes, over the {MAX_TARGET_BYTES} this "
                "server reads"
            )
        return BadRequest(f"the request target is not a path nor an absolute URL: {error}")

    def _start(self, cycle: Exchange) -> None:
        """Run the application on ``cycle``'s request, in a task the server waits for at exit."""
        self._running = cycle
        task = self.loop.create_task(cycle.run_asgi(self.app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_body(self, body: bytes) -> None:
        self._trailer_bytes = None  # chunk data: not the last chunk
        cycle = self.cycle
        if cycle.response_complete:  # answered before its body came
            return
        cycle.chunks.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.set()

    def on_chunk_header(self) -> None:
        self._trailer_bytes = -1

    def on_chunk_complete(self) -> None:
        self._trailer_bytes = None

    def on_message_complete(self) -> None:
        self._in_body = False
        self._trailer_bytes = None
        self._cancel_body_timer()
        cycle = self.cycle
        if not cycle.response_complete:
            cycle.more_body = False
            cycle.set()

    def resume_reading(self) -> None:
        """Read again, unless requests read ahead wait for their turn: those are answered first,
        so that a client cannot queue more than ``MAX_PIPELINED`` of them (it would, one read's
        worth after each answer)."""
        if not self.pipeline:
            self.flow.resume_reading()

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self.pipeline:
            cycle, _ = self.pipeline.pop()
            self._start(cycle)  # type: ignore[arg-type]
            self.resume_reading()
            return
        self.flow.resume_reading()
        if self._invalid is not None:
            self._reject(*self._invalid)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def pause_writing(self) -> None:
        """The send buffer is full: the client has ``body_timeout_s`` to read some of it."""
        super().pause_writing()
        if self._write_timer is None:
            self._write_taken = _taken(self.transport)
            self._write_timer = self.loop.call_later(self.limits.body_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        """``body_timeout_s`` with the send buffer full. If the client took some of the answers
        meanwhile, it has another period; if it took nothing, nothing more can be written to
        it, so the connection (and what waits to be sent) goes."""
        self._write_timer = None
        if not self.flow.write_paused or self.transport.is_closing():
            return
        taken = _taken(self.transport)
        if taken > self._write_taken:  # a slow reader, not a stopped one
            self._write_taken = taken
            self._write_timer = self.loop.call_later(self.limits.body_timeout_s, self._write_timed_out)
            return
        self.transport.abort()

    def timeout_keep_alive_handler(self) -> None:
        """Close the connection if it has been idle ``timeout_keep_alive`` seconds since its last
        answer; if it was busy since, wait until the next answer re-arms the timer."""
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None or self.transport.is_closing():
            return
        left_s = idle_since + self.timeout_keep_alive - self.loop.time()
        if left_s > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left_s, self.timeout_keep_alive_handler)
            return
        self.transport.close()

    # timers

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._head_begun:  # nothing sent: close as an idle connection
            self.transport.close()
            return
        if self.flow.read_paused:  # the server is not reading: the client cannot be late
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
            return
        self._refuse(
            408,
            b"Request Timeout",
            f"the request line and headers did not arrive within {self.limits.header_timeout_s:g} s "
            "(--header_timeout_s)",
        )

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_complete:  # answered without its body
            self.transport.close()
            return
        idle_s = self.loop.time() - self._body_read_at
        if self.flow.read_paused or idle_s < self.limits.body_timeout_s:  # the server's pause, or progress
            self._body_read_at = self.loop.time() if self.flow.read_paused else self._body_read_at
            wait_s = self.limits.body_timeout_s - (self.loop.time() - self._body_read_at)
            self._body_timer = self.loop.call_later(wait_s, self._body_timed_out)
            return
        self._refuse(
            408,
            b"Request Timeout",
            f"the request body stalled for {self.limits.body_timeout_s:g} s (--body_timeout_s)",
            self._being_read(),
        )

    def _being_read(self) -> Exchange | None:
        """The request whose body is being read and is not answered yet, if any."""
        cycle = self.cycle
        return cycle if self._in_body and cycle is not None and not cycle.response_complete else None

    def _refuse(self, status: int, reason: bytes, message: str, request: Exchange | None = None) -> None:
        """Refuse the request being read and read nothing more: answer ``status`` with
        ``message`` and close, once the requests before it are answered (at once when none
        waits). ``request``: its exchange, when its head was read; its application stops and
        it gets no answer of its own."""
        self._refused = True
        self._cancel_head_timer()
        if request is not None:
            self._in_body = False
            self._cancel_body_timer()
            request.disconnected = True  # its application stops waiting for the body
            request.set()
            if self.pipeline and self.pipeline[0][0] is request:  # queued, never started
                self.pipeline.popleft()
        running = self._running
        if running is not None and running is not request and not running.response_complete:
            self._invalid = (status, reason, message)  # answered after those before it
        elif request is not None and request.response_started:  # part of its answer went out
            self.transport.close()
        else:
            self._reject(status, reason, message)

    def _reject(self, status: int, reason: bytes, message: str) -> None:
        """Answer ``status`` with inferd's JSON error and close the connection."""
        self.transport.write(_answer(status, reason, message, self.server_state.default_headers))
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
