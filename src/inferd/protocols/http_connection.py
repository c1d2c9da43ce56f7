"""The REST port's connections: how many may be open, how long a client may take to send a
request, and how large its head may grow while it is read.

uvicorn's httptools protocol parses HTTP/1.1; ``connection_class`` subclasses it with what a
hostile or broken client must not be able to hold:

- a connection past ``max_connections`` gets ``503`` and is closed at accept, before it is read;
- the request line and headers must arrive within ``header_timeout_s`` of the connection opening
  (or of the first byte of a kept-alive connection's next request): else ``408`` and close
  (a connection that sent nothing is closed without an answer);
- a body must not pause for ``body_timeout_s`` between two reads: else ``408`` and close (the
  time the server itself stops reading, to apply back-pressure, does not count);
- the head may not grow past ``max_header_bytes`` while it is read: ``413`` and close, so a huge
  header costs at most that plus one socket read (the application checks the exact size of heads
  that arrive whole);
- a WebSocket upgrade is answered as a plain HTTP request (inferd serves no WebSocket), without a
  log line.

Idle kept-alive connections close after uvicorn's ``timeout_keep_alive``.

Each request's scope carries a ``RequestWatch`` (``scope["extensions"][WATCH]``) through which
the connection cancels the application's work for it when the client hangs up, without a task
per request waiting for the disconnect.
"""

from __future__ import annotations

import asyncio
import resource
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inferd.config import ServerConfig
from inferd.errors import ConfigError

WATCH = "inferd.watch"
"""The scope extension that holds a request's ``RequestWatch``."""

AUTO_CONNECTIONS_CAP = 10_000
"""The most connections ``--max_connections 0`` (auto) allows per port."""


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


def connection_class(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol under ``limits``; give it to ``uvicorn.Config(http=...)``."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


def _answer(status: int, reason: bytes, message: str, *extra: bytes) -> bytes:
    """A whole HTTP/1.1 answer with inferd's ``{"error": ...}`` body that closes the connection."""
    body = orjson.dumps({"error": message})
    head = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        *extra,
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _no_cycle() -> None:
    """What ``RequestWatch`` holds before uvicorn made the request's cycle: no cycle."""
    return None


class RequestWatch:
    """One request's link to its connection. It ends the request's computation early: when the
    client hangs up (``hang_up``, from the connection) or its deadline passes (``expire``, from a
    timer), the task in ``task`` is cancelled and the flag says why. ``task`` is set only while
    the answer is computed (the body was read and nothing is sent yet). ``send_whole`` writes a
    whole answer at once. ``step`` lets the port's other requests catch up. Event loop thread
    only."""

    __slots__ = ("_cycle", "_tasks", "expired", "hung_up", "task")

    def __init__(self, tasks: Collection[asyncio.Task[Any]] = ()) -> None:
        """``tasks``: the port's request tasks (uvicorn's, begun or not; a finished one stays
        until a later turn)."""
        self.task: asyncio.Task[Any] | None = None
        self._tasks = tasks
        self.hung_up = False
        self.expired = False
        # Gives uvicorn's RequestResponseCycle of the request once it is made (a weak reference;
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
            self.task.cancel()

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
        written) when it cannot: no cycle, an answer started, the client gone, or a header value
        holding a line break. Saves the second write and the two ASGI messages."""
        cycle = self._cycle()
        if cycle is None or cycle.response_started or cycle.disconnected:
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


class LimitedHttpProtocol(HttpToolsProtocol):
    """One REST connection under ``limits`` (set by ``connection_class``). Runs on the event loop."""

    limits: ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None  # bytes read of the head in progress, None between heads
        self._head_begun = False  # the head in progress has its first byte
        self._head_began_in_read = False  # ... and it came in the read being parsed
        self._in_body = False  # between the end of the head and the end of the request
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_read_at = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refused = True
            message = (
                f"the server holds {self.limits.max_connections} connections, its limit "
                "(--max_connections); retry"
            )
            transport.write(_answer(503, b"Service Unavailable", message, b"retry-after: 1"))
            transport.close()
            return
        self._head_bytes = 0  # the first head's deadline runs from the connection's opening
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            watch: RequestWatch = cycle.scope["extensions"][WATCH]  # type: ignore[assignment]
            watch.hang_up()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._head_began_in_read = False
        super().data_received(data)
        # Timers are armed only for a request that one read did not bring whole, so that the
        # usual small request costs none.
        if self._in_body:
            self._body_read_at = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)
        if self._head_bytes is None or self.transport.is_closing():
            return
        if self._head_timer is None and self._head_begun:  # the next head on a kept-alive connection
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        if not self._head_began_in_read:  # that read may hold the end of the request before
            self._head_bytes += len(data)
        if self._head_bytes > self.limits.max_header_bytes:
            self._close_with(
                413,
                b"Content Too Large",
                f"the request line and headers take more than {self.limits.max_header_bytes} bytes, "
                f"the limit (--max_header_bytes)",
            )

    # httptools callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_bytes is None:  # the next request on a kept-alive connection
            self._head_bytes = 0
        self._head_begun = True
        self._head_began_in_read = True

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._head_bytes = None
        self._head_begun = False
        # before super() hands the scope over
        watch = RequestWatch(self.tasks)
        self.scope["extensions"] = {WATCH: watch}  # type: ignore[dict-item]
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:
            watch._cycle = weakref.ref(self.cycle)
        self._in_body = True

    def on_message_complete(self) -> None:
        self._in_body = False
        self._cancel_body_timer()
        super().on_message_complete()

    def _unsupported_upgrade_warning(self) -> None:
        """A WebSocket (or other) upgrade was answered as plain HTTP: nothing to log."""

    # timers

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._head_begun:  # nothing sent: close as an idle connection
            self.transport.close()
            return
        self._close_with(
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
        self._close_with(
            408,
            b"Request Timeout",
            f"the request body stalled for {self.limits.body_timeout_s:g} s (--body_timeout_s)",
        )

    def _close_with(self, status: int, reason: bytes, message: str) -> None:
        """Answer ``status`` unless an answer was started already, then close the connection; the
        request's application task then sees a disconnect."""
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if not (busy and cycle.response_started):
            self.transport.write(_answer(status, reason, message))
        if busy:  # as uvicorn does when the connection is lost
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
