"""Where a REST request body is decoded: inline on the event loop when it is small, on the
decode thread when it is mid-sized, in a decode process when it is large, so that a few large
JSON bodies do not stall every other client.

Parsing JSON and turning its lists into arrays hold the GIL for whole calls (0.5-0.8 s for a
48 MiB body), so a thread alone lets the event loop run only between the decoder's steps. A
body from ``PROCESS_BODY_BYTES`` on is decoded in a child process instead (when the caller has
a picklable decoder for it): the child parses the JSON and makes the ndarrays; this process
only copies the body out and unpickles the arrays back, which is a few memcpys. One thread and
``processes`` children decode at a time, which also bounds the memory that decoded Python
lists take to that many bodies' worth; the body's bytes stay counted in the in-flight budget
until its decode returns.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import sys
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeGuard, TypeVar

from inferd.errors import InvalidArgument, ResourceExhausted, Unavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

LARGE_BODY_BYTES = 64 * 1024
"""Bodies from this size on are decoded off the event loop. Measured on the development
machine: a V2 JSON body of 110 KiB takes ~1.5 ms to decode, the hop to a thread and back
~0.09 ms; below this size a body holds the event loop for under ~1 ms, above it the hop costs
under a tenth of the decode."""

PROCESS_BODY_BYTES = 1024 * 1024
"""Bodies from this size on go to a decode process (when one is configured). Measured on the
shared development machine (V2 JSON, FP32; ``_decode_request`` inline vs. the GIL work the hop
leaves in this process: pickling the body out, unpickling the arrays back): 256 KiB 13.6 ms vs
0.5 ms, 1 MiB 72 ms vs 0.7 ms, 4 MiB 368 ms vs 9 ms, 16 MiB 2.8 s vs 39 ms; the round trip
itself is about the inline decode. The hop pays from well below 1 MiB, but the thread is
cheaper to reach and a mid-sized body holds the GIL only for tens of ms there, so the hop starts
where that stall reaches ~50 ms."""


class BodyDecoder:
    """The decode thread and a lazily started pool of ``processes`` decode processes.

    The pool is spawned (not forked: the server runs threads) at the first large body; a child
    that dies fails the calls it had and the pool is replaced. ``close()`` ends both.
    """

    def __init__(self, processes: int = 1) -> None:
        """``processes``: decode processes (0: large bodies are decoded on the thread too)."""
        self.processes = processes
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="inferd-decode")
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._running = 0  # calls in ``apart``

    def in_process(self, size: int) -> bool:
        """True when a body of ``size`` bytes is to be decoded in a decode process."""
        return self.processes > 0 and size >= PROCESS_BODY_BYTES and not self._closed

    async def on_thread(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the decode thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def apart(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a decode process: ``function`` is a module-level function and
        ``args`` and its result are picklable. Exceptions it raises propagate unchanged.

        Raises:
            Unavailable: the decode process exited twice while it had this call (the pool is
                replaced each time, so later calls are decoded again).
        """
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            pool = self._processes()
            self._running += 1
            try:
                return await loop.run_in_executor(pool, function, *args)
            except BrokenProcessPool:
                # Every call the dead child's pool held fails at once; each is tried once more on
                # a fresh pool, so only a body that kills its decoder twice is refused.
                self._replace(pool)
                log.warning("a decode process exited; replaced it (attempt %d)", attempt + 1)
            finally:
                self._running -= 1
        raise Unavailable("the process decoding this request body exited; the request was not run")

    def close(self) -> None:
        """End the thread and the decode processes; calls still queued are cancelled."""
        self._closed = True
        self._thread.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._running:
            _terminate(pool)  # not waiting for bodies being decoded
        elif pool is not None:  # idle: ends the children cleanly, releasing their queues' semaphores
            pool.shutdown(wait=True, cancel_futures=True)

    def _processes(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=context, initializer=_deep_results
                )
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        _terminate(broken)


_PICKLE_DEPTH = 8 * 1024
"""The recursion a decode process allows: pickling its result recurses about twice per level of
nesting, and orjson reads JSON up to 1,024 levels deep (at Python's default of 1,000, a body
whose parameters nested 600 deep answered 500)."""


def _deep_results() -> None:
    """Let a decode process pickle back any document orjson parsed."""
    sys.setrecursionlimit(_PICKLE_DEPTH)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Shut ``pool`` down without waiting for the body a child may be decoding."""
    children = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for child in children:
        if child.is_alive():
            child.terminate()


def off_loop(pool: BodyDecoder | None, size: int) -> TypeGuard[BodyDecoder]:
    """Whether a body (or gRPC message) of ``size`` bytes is decoded on ``pool``'s decode thread
    rather than inline: from ``LARGE_BODY_BYTES`` on, when a pool is given."""
    return pool is not None and size >= LARGE_BODY_BYTES


async def decode(pool: BodyDecoder | None, size: int, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, run on ``pool``'s decode thread when ``off_loop(pool, size)`` (``size``:
    the body's bytes), else inline. Exceptions propagate unchanged."""
    if off_loop(pool, size):
        return await pool.on_thread(function, *args)
    return function(*args)


async def decode_apart(pool: BodyDecoder | None, size: int, function: Callable[..., T], *args: Any) -> T:
    """As ``decode``, but in a decode process when ``pool.in_process(size)``: ``function`` must
    be a module-level function whose arguments and result pickle."""
    if pool is not None and pool.in_process(size):
        return await pool.apart(function, *args)
    return await decode(pool, size, function, *args)


CONTENT_ENCODINGS = (b"gzip", b"x-gzip", b"deflate")
"""The ``Content-Encoding`` of a request body that ``inflate`` decompresses (tritonclient's
``request_compression_algorithm``: gzip, or deflate as zlib's format)."""


def inflate(body: bytes, encoding: bytes, max_bytes: int) -> bytes:
    """``body`` sent with ``Content-Encoding: encoding`` (one of ``CONTENT_ENCODINGS``, any
    case), decompressed to at most ``max_bytes``; zlib lets go of the GIL while it works.

    Raises:
        InvalidArgument: another encoding, or a body that is not one whole stream of it.
        ResourceExhausted: it decompresses to more than ``max_bytes`` (--max_request_bytes).
    """
    name = encoding.strip().lower()
    if name not in CONTENT_ENCODINGS:
        shown = name[:40].decode("latin-1")
        raise InvalidArgument(f"Content-Encoding {shown!r} is not supported; send gzip, deflate or identity")
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header, read from the data
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"the body is not valid {name.decode()} data: {exc}") from None
    if len(data) > max_bytes:
        raise ResourceExhausted(
            f"the request body decompresses to more than the limit of {max_bytes} bytes (--max_request_bytes)"
        )
    if not inflater.eof or inflater.unused_data:
        raise InvalidArgument(f"the body is not one whole {name.decode()} stream")
    return data
