"""The log rate limit: a burst of each kind of record, then a count of what was held back."""

from __future__ import annotations

import logging

from inferd.log_limits import LogRateLimit


def record(msg: str, level: int = logging.WARNING, name: str = "uvicorn.error") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_each_kind_passes_a_burst_per_interval_then_reports_what_it_held_back() -> None:
    now = [0.0]
    limit = LogRateLimit(burst=3, interval_s=10.0, clock=lambda: now[0])
    passed = [limit.filter(r) for r in (record("bad request") for _ in range(10))]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(record("another message"))  # another kind has its own burst
    now[0] = 10.0
    again = record("bad request")
    assert limit.filter(again)
    assert again.getMessage() == "bad request [7 similar message(s) suppressed in the last 10 s]"


def test_the_last_record_of_a_burst_says_more_are_suppressed() -> None:
    limit = LogRateLimit(burst=2, interval_s=60.0, clock=lambda: 0.0)
    first, second = record("x %s"), record("x %s")
    first.args = second.args = ("a",)
    assert limit.filter(first)
    assert limit.filter(second)
    assert first.getMessage() == "x a"
    assert second.getMessage() == "x a [further similar messages suppressed for up to 60 s]"


def test_info_and_debug_always_pass() -> None:
    limit = LogRateLimit(burst=1, interval_s=60.0, clock=lambda: 0.0)
    assert all(limit.filter(record("serving", logging.INFO)) for _ in range(5))
