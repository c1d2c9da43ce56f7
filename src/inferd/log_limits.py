"""A bound on what clients can make the server write to its log.

Malformed requests, refused connections and failing calls each log a line at most; a client
that sends thousands of them would otherwise grow the log without bound. ``LogRateLimit`` lets
``burst`` records of one kind (logger, level and message template, whatever its arguments)
through per ``interval_s``, marks the last one let through, and reports the count it held back
on the first record of that kind it lets through again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

BURST = 10
"""Records of one kind let through per interval."""
INTERVAL_S = 60.0
"""The interval, seconds."""
MAX_KINDS = 1024
"""Kinds of record tracked at once; the oldest are forgotten past it."""


class LogRateLimit(logging.Filter):
    """A handler filter: WARNING and above pass at most ``burst`` times per ``interval_s`` and
    kind of record; DEBUG and INFO always pass. Thread-safe enough for logging's use: a race can
    only let a record more through."""

    def __init__(
        self,
        burst: int = BURST,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._burst = burst
        self._interval_s = interval_s
        self._clock = clock
        self._windows: dict[tuple[str, int, str], list[float]] = {}  # start, passed, held back

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self._interval_s:
            held_back = int(window[2]) if window else 0
            if window is None and len(self._windows) >= MAX_KINDS:
                del self._windows[next(iter(self._windows))]
            self._windows[key] = [now, 1, 0]
            if held_back:
                self._note(
                    record, f"{held_back} similar message(s) suppressed in the last {self._interval_s:g} s"
                )
            return True
        window[1] += 1
        if window[1] <= self._burst:
            if window[1] == self._burst:
                self._note(record, f"further similar messages suppressed for up to {self._interval_s:g} s")
            return True
        window[2] += 1
        return False

    @staticmethod
    def _note(record: logging.LogRecord, note: str) -> None:
        if not getattr(record, "inferd_noted", False):  # a record may pass several handlers
            record.msg = f"{record.msg} [{note}]"
            record.inferd_noted = True


def limit_handlers(loggers: Iterable[logging.Logger], limit: LogRateLimit) -> None:
    """Add ``limit`` to every handler of ``loggers`` (records that reach a handler pass its filters,
    whichever logger they came from)."""
    for logger in loggers:
        for handler in logger.handlers:
            if limit not in handler.filters:
                handler.addFilter(limit)
