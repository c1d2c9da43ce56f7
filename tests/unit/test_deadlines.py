"""The REST port's request deadlines share one timer (``Deadlines``): a request whose deadline
passes is expired, one that ended in time is not, and met deadlines are not kept."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import uvloop

from inferd.protocols.deadlines import Deadlines
from inferd.protocols.http_connection import RequestWatch


async def _request(deadlines: Deadlines, seconds: float, work: Awaitable[object] | None = None) -> str:
    """A request that takes ``seconds`` (or waits for ``work``) under ``deadlines``, as ``HttpApp``
    runs one: how it ended."""
    task = asyncio.current_task()
    assert task is not None
    watch = RequestWatch()
    watch.task = task
    deadlines.start(watch)
    try:
        await (asyncio.sleep(seconds) if work is None else work)
        return "answered"
    except asyncio.CancelledError:
        if not watch.expired:
            raise
        return "expired"
    finally:
        watch.task = None
        deadlines.end()


def test_only_the_requests_past_their_deadline_are_expired() -> None:
    async def main() -> list[str]:
        deadlines = Deadlines(0.2)
        quick = [asyncio.create_task(_request(deadlines, 0.01 * i)) for i in range(5)]
        slow = [asyncio.create_task(_request(deadlines, 5)) for _ in range(3)]
        await asyncio.sleep(0.05)
        late = asyncio.create_task(_request(deadlines, 0.3))  # starts later, expires later
        ended = await asyncio.gather(*quick, *slow, late)
        assert len(deadlines) == 0
        return ended

    started = asyncio.get_event_loop_policy().new_event_loop()
    try:
        clock = started.time()
        assert started.run_until_complete(main()) == ["answered"] * 5 + ["expired"] * 4
        assert 0.25 <= started.time() - clock < 1.0  # the late one expired 0.2 s after its start
    finally:
        started.close()


def test_one_timer_serves_every_request_in_flight() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(30)
        done = asyncio.Event()
        tasks = [asyncio.create_task(_request(deadlines, 0, done.wait())) for _ in range(100)]
        await asyncio.sleep(0)
        timers = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        assert len(timers) == 1
        done.set()
        assert await asyncio.gather(*tasks) == ["answered"] * 100

    asyncio.run(main())


def test_met_deadlines_behind_a_slow_request_are_dropped() -> None:
    async def main() -> None:
        deadlines = Deadlines(30)
        slow = asyncio.create_task(_request(deadlines, 0.5))
        await asyncio.sleep(0)
        for _ in range(2_000):
            await _request(deadlines, 0)
        assert len(deadlines) <= 64 + 4 * 2  # not 2,001: compacted while the slow one runs
        assert await slow == "answered"
        assert len(deadlines) == 0

    asyncio.run(main())


def test_a_new_event_loop_starts_afresh() -> None:
    deadlines = Deadlines(0.1)

    async def abandon() -> None:  # a loop that closes with a request in flight
        asyncio.get_running_loop().create_task(_request(deadlines, 10))
        await asyncio.sleep(0)

    asyncio.run(abandon())

    async def main() -> str:
        return await _request(deadlines, 1)

    assert asyncio.run(main()) == "expired"  # the second loop got a timer of its own


class CountingDeadlines(Deadlines):
    """Counts the timer's firings."""

    __slots__ = ("firings",)

    def __init__(self, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self.firings = 0

    def _expire(self, loop: asyncio.AbstractEventLoop, epoch: int) -> None:
        self.firings += 1
        super()._expire(loop, epoch)


def test_on_uvloop_the_timer_fires_once_for_each_deadline() -> None:
    """uvloop's clock counts whole milliseconds: a deadline a rounding error past the time the
    timer fires at must not re-arm it on every turn until the clock ticks (it did for about
    four in ten 5 ms deadlines, up to 567 times)."""

    async def main() -> None:
        deadlines = CountingDeadlines(0.005)
        for _ in range(100):
            assert await _request(deadlines, 10) == "expired"
        assert deadlines.firings == 100

    uvloop.run(main())
