from __future__ import annotations

import pytest

from inferd.errors import InvalidArgument
from inferd.rollout import Guard, _p99_ms


def test_guards_parse_absolute_and_relative_bounds() -> None:
    assert Guard.parse("error_rate<=0.01") == Guard("error_rate", "<=", 0.01, False)
    assert Guard.parse(" p99_ms <= 1.2*baseline ") == Guard("p99_ms", "<=", 1.2, True)
    assert Guard.parse("agreement>=0.98") == Guard("agreement", ">=", 0.98, False)
    assert str(Guard.parse("p99_ms<=1.2*baseline")) == "p99_ms<=1.2*baseline"


@pytest.mark.parametrize("text", ["latency<=3", "error_rate=0.1", "p99_ms<=fast", "agreement>=1.2.3"])
def test_a_bad_guard_names_the_expected_form(text: str) -> None:
    with pytest.raises(InvalidArgument, match="guard"):
        Guard.parse(text)


def test_guards_hold_on_missing_readings_and_compare_with_the_baseline() -> None:
    guard = Guard.parse("p99_ms<=1.2*baseline")
    assert guard.holds(11.0, 10.0)
    assert not guard.holds(13.0, 10.0)
    assert guard.holds(None, 10.0)
    assert guard.holds(13.0, None)
    assert not Guard.parse("error_rate<=0.01").holds(0.02, None)


def test_p99_is_the_upper_bound_of_the_bucket_holding_it() -> None:
    assert _p99_ms([0] * 18) is None
    buckets = [0] * 18
    buckets[4] = 99  # <= 1 ms
    buckets[7] = 1  # <= 10 ms
    assert _p99_ms(buckets) == 1.0
    buckets[7] = 2
    assert _p99_ms(buckets) == 10.0
