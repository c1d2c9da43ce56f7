"""The REST port's request deadlines, on one timer.

Every REST request gets the same timeout (``--rest_api_timeout_in_ms``), so the deadlines pass in
the order the requests began. ``Deadlines`` keeps them in that order and arms one timer, for the
first one not yet met, where a timer armed and cancelled for each request cost 4.5-6 us of that
request's CPU (docs/performance.md, "Request deadlines").
"""

from __future__ import annotations

import asyncio
from collections import deque

from inferd.protocols.http_connection import RequestWatch

_SLACK = 64
"""Met deadlines kept behind a slow request before the queue is compacted: it is compacted when it
holds more than this plus four times the requests in flight."""


class Deadlines:
    """The deadlines of the requests in flight, each ``timeout_s`` after ``start``: when one
    passes, that request's ``RequestWatch.expire`` is called. One event loop at a time, on its
    thread: a new loop starts afresh, and the requests the last one left lose their deadlines."""

    __slots__ = ("_armed_for", "_epoch", "_in_flight", "_loop", "_timeout_s", "_timer", "_watches")

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._watches: deque[tuple[float, RequestWatch]] = deque()  # (loop time it passes, watch)
        self._in_flight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0  # the loop time the timer was armed for
        self._loop: asyncio.AbstractEventLoop | None = None
        self._epoch = 0  # loops seen: a timer armed under an earlier one does nothing

    def __len__(self) -> int:
        """The deadlines held: those in flight, and met ones not yet dropped behind a slow one."""
        return len(self._watches)

    def start(self, watch: RequestWatch) -> None:
        """Start the deadline of the request whose ``watch.task`` is set. The deadline counts as
        met once ``watch.task`` is None again; call ``end`` then, whatever became of the request."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests run several): what the old one held is gone
            self._loop, self._timer, self._in_flight = loop, None, 0
            self._epoch += 1
            self._watches.clear()
        passes = loop.time() + self._timeout_s
        self._watches.append((passes, watch))
        self._in_flight += 1
        if self._timer is None:
            self._arm(loop, passes)

    def end(self) -> None:
        """A request whose deadline ``start`` started is over (its watch's ``task`` is None)."""
        self._in_flight = max(self._in_flight - 1, 0)  # (0 for a request of a loop gone before)
        watches = self._watches
        while watches and watches[0][1].task is None:
            watches.popleft()
        if len(watches) > _SLACK + 4 * self._in_flight:  # met ones behind a slow request
            self._watches = deque(entry for entry in watches if entry[1].task is not None)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._armed_for = when
        self._timer = loop.call_at(when, self._expire, loop, self._epoch)

    def _expire(self, loop: asyncio.AbstractEventLoop, epoch: int) -> None:
        """The timer: expire the requests whose deadline passed, then arm it for the next one."""
        if epoch != self._epoch:  # armed under a loop gone before (or before it came back)
            return
        self._timer = None
        # The time armed for counts as reached: uvloop's clock counts whole milliseconds, and
        # a deadline a rounding error past it would re-arm the timer on every turn until the
        # clock ticks.
        now = max(loop.time(), self._armed_for)
        watches = self._watches
        while watches and (watches[0][1].task is None or watches[0][0] <= now):
            watches.popleft()[1].expire()  # a no-op once its task is None
        if watches:
            self._arm(loop, watches[0][0])
