"""CallCosts: which model calls run on the event loop, judged by the signature's recent calls."""

from __future__ import annotations

from inferd.placement import INLINE_PREDICT_S, SAMPLES, CallCosts


def test_nothing_runs_on_the_loop_before_a_first_call_nor_when_not_allowed() -> None:
    assert not CallCosts().inline(1)
    barred = CallCosts(allowed=False)
    barred.add(1, 1e-6)
    assert not barred.inline(1)


def test_a_fast_call_scales_with_its_rows() -> None:
    costs = CallCosts()
    costs.add(1, INLINE_PREDICT_S / 10)
    assert costs.inline(1)
    assert costs.inline(10)
    assert not costs.inline(11)


def test_a_large_batchs_cost_per_row_does_not_bring_a_small_call_of_a_slow_model_onto_the_loop() -> None:
    costs = CallCosts()
    costs.add(32, 335e-6)  # a CNN batch: about 10 us a row, 335 us a call
    assert not costs.inline(1)
    assert not costs.inline(4)


def test_the_fastest_of_the_recent_calls_judges_and_old_ones_drop_out() -> None:
    costs = CallCosts()
    costs.add(1, INLINE_PREDICT_S / 2)
    for _ in range(SAMPLES - 1):
        costs.add(1, INLINE_PREDICT_S * 3)  # stretched by the scheduler
    assert costs.inline(1)
    costs.add(1, INLINE_PREDICT_S * 3)  # the fast one is now older than the last SAMPLES
    assert not costs.inline(1)
