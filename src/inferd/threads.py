"""Threads that run blocking calls for the event loop: model calls and batches.

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` passes each call through a
``concurrent.futures.Future`` (a lock and a condition), chains it to an asyncio future with
callbacks both ways, and sends the result back through both: 30 µs of CPU per call one at a time
and 14 µs at eight at a time, on one core with uvloop. ``ThreadPool`` hands the call to a thread
with the awaiting task's future and sends the outcome back with one ``call_soon_threadsafe``: 23
and 5 µs (``bench.thread_hop``; docs/performance.md, "Handing a call to a thread").
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class ThreadPool:
    """Up to ``size`` threads (named ``NAME_0``, ``NAME_1``, ...), each started when a call finds
    none idle, as ``ThreadPoolExecutor`` does.

    A call whose awaiting task is cancelled before a thread takes it up is not run; one already
    running runs to its end, its outcome dropped. A ``StopIteration`` the call raises comes back
    as a ``RuntimeError`` (an asyncio future cannot hold one).
    """

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError(f"a thread pool needs at least one thread, got {size}")
        self._size = size
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by a thread each time it ends a call
        self._threads: list[threading.Thread] = []
        self._closed = False

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on one of the threads, awaited; what it returns or raises.

        Raises:
            RuntimeError: the pool is shut down.
        """
        if self._closed:
            raise RuntimeError(f"thread pool {self._name} is shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._size:
            name = f"{self._name}_{len(self._threads)}"
            thread = threading.Thread(target=self._work, name=name, daemon=True)
            thread.start()  # before the call is queued: a thread that cannot start queues nothing
            self._threads.append(thread)
        self._calls.put((loop, future, function, args))
        return await future

    def shutdown(self, cancel: bool = False) -> None:
        """Let the threads end once the calls queued are done (``cancel``: once those running
        are done; the others are cancelled). Returns at once; later ``run`` calls raise."""
        self._closed = True
        if cancel:
            with contextlib.suppress(queue.Empty):
                while (call := self._calls.get_nowait()) is not None:
                    loop, future = call[0], call[1]
                    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                        loop.call_soon_threadsafe(future.cancel)
        for _ in self._threads:
            self._calls.put(None)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, function, args = call
            del call
            outcome = None if future.cancelled() else _outcome(function, args)  # a read: safe here
            self._idle.release()  # before the answer, so that its task's next call finds us idle
            if outcome is not None:
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, future, *outcome)
            del loop, future, function, args, outcome


def _outcome(function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, BaseException | None]:
    """What ``function(*args)`` returned, or raised (a ``StopIteration`` as a ``RuntimeError``:
    a future refuses one, and its task would wait forever)."""
    try:
        return function(*args), None
    except StopIteration as error:
        stopped = RuntimeError(f"{getattr(function, '__name__', function)} raised StopIteration")
        stopped.__cause__ = error
        return None, stopped
    except BaseException as error:  # the awaiting task's to handle, as in an executor
        return None, error


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled while it ran
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
