"""ThreadPool: calls run on its threads and come back to the awaiting task, a cancelled call
that no thread took up never runs, and nothing leaves its caller waiting forever."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from inferd.threads import ThreadPool

T = TypeVar("T")


def run(test: Callable[[ThreadPool], Coroutine[Any, Any, T]], size: int = 1) -> T:
    pool = ThreadPool(size, "worker")
    try:
        return asyncio.run(asyncio.wait_for(test(pool), 10))
    finally:
        pool.shutdown(cancel=True)


def test_a_call_runs_on_a_named_thread_and_its_result_or_error_comes_back() -> None:
    def boom() -> None:
        raise ValueError("bad rows")

    async def test(pool: ThreadPool) -> None:
        assert await pool.run(lambda a, b: (a + b, threading.current_thread().name), 2, 3) == (5, "worker_0")
        with pytest.raises(ValueError, match="bad rows"):
            await pool.run(boom)

    run(test)


def test_a_stop_iteration_comes_back_as_a_runtime_error_instead_of_a_task_that_never_ends() -> None:
    def empty() -> int:
        return next(iter([]))

    async def test(pool: ThreadPool) -> None:
        with pytest.raises(RuntimeError, match="StopIteration"):
            await pool.run(empty)

    run(test)


def test_threads_start_as_calls_need_them_up_to_the_size() -> None:
    gate = threading.Event()

    def held() -> str:
        assert gate.wait(5)
        return threading.current_thread().name

    async def test(pool: ThreadPool) -> None:
        one_at_a_time = {await pool.run(lambda: threading.current_thread().name) for _ in range(20)}
        assert one_at_a_time == {"worker_0"}  # a thread starts only when none is idle
        calls = [asyncio.ensure_future(pool.run(held)) for _ in range(3)]
        await asyncio.sleep(0.1)
        gate.set()
        names = await asyncio.gather(*calls)
        assert sorted(set(names)) == ["worker_0", "worker_1"]  # two at once, never a third

    run(test, size=2)


def test_a_call_cancelled_before_a_thread_took_it_never_runs() -> None:
    gate, ran = threading.Event(), []

    async def test(pool: ThreadPool) -> None:
        first = asyncio.ensure_future(pool.run(gate.wait, 5))
        second = asyncio.ensure_future(pool.run(ran.append, "second"))
        await asyncio.sleep(0.05)
        second.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        assert await first is True
        assert await pool.run(ran.append, "third") is None
        assert second.cancelled()

    run(test)
    assert ran == ["third"]


def test_shutdown_cancels_the_queued_calls_and_refuses_new_ones() -> None:
    gate = threading.Event()

    async def test(pool: ThreadPool) -> None:
        running = asyncio.ensure_future(pool.run(gate.wait, 5))
        queued = asyncio.ensure_future(pool.run(lambda: "never"))
        await asyncio.sleep(0.05)
        pool.shutdown(cancel=True)
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.set()
        assert await running is True  # the running call ends and answers
        with pytest.raises(RuntimeError, match="shut down"):
            await pool.run(lambda: None)

    run(test)
