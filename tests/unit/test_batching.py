import asyncio
import gc
import threading
import time
import weakref

import numpy as np
import pytest

from inferd.batching import Aimd, Batcher
from inferd.config import BatchingParameters
from inferd.errors import ConfigError, DeadlineExceeded, InvalidArgument, Unavailable
from inferd.placement import INLINE_PREDICT_S, CallCosts
from inferd.types import Tensors


async def _until_set(event: threading.Event) -> None:
    """Until a thread sets ``event`` (at most 10 s), letting the event loop run."""
    for _ in range(10_000):
        if event.is_set():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the event was never set")


def test_aimd_grows_by_one_after_full_fast_batches_and_shrinks_by_ten_percent_when_slow() -> None:
    aimd = Aimd(target_p99_ms=20, max_batch_size=64, max_wait_s=0.005)
    for _ in range(30):
        aimd.observe(aimd.batch_size, 0.002)  # full batches, well within 10 ms (half the objective)
    assert aimd.batch_size == 31
    aimd.observe(31, 0.012)  # over half the objective
    assert aimd.batch_size == 27
    aimd.observe(3, 0.001)  # a batch that was not full does not grow the target
    assert aimd.batch_size == 27
    assert 0 <= aimd.wait_s <= 0.005


def test_aimd_never_passes_its_bounds() -> None:
    aimd = Aimd(target_p99_ms=10, max_batch_size=4, max_wait_s=0.001)
    for _ in range(10):
        aimd.observe(aimd.batch_size, 0.0001)
    assert aimd.batch_size == 4
    for _ in range(50):
        aimd.observe(aimd.batch_size, 1.0)
    assert aimd.batch_size == 1
    assert aimd.wait_s == 0.0


def test_batching_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match="Last entry in allowed_batch_sizes must match max_batch_size"):
        BatchingParameters(max_batch_size=8, allowed_batch_sizes=(2, 4))
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1"):
        BatchingParameters(max_batch_size=0)


def test_rows_of_concurrent_submissions_come_back_to_their_callers() -> None:
    calls: list[int] = []

    def predict(inputs: Tensors) -> Tensors:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"] * 10}

    async def scenario() -> list[Tensors]:
        params = BatchingParameters(max_batch_size=6, batch_timeout_micros=20_000, num_batch_threads=1)
        batcher = Batcher(predict, params)
        sizes = [1, 3, 2, 5, 9]
        start = np.cumsum([0, *sizes])
        results = await asyncio.gather(
            *(batcher.submit({"x": np.arange(a, a + n)}, n) for a, n in zip(start, sizes, strict=False))
        )
        batcher.close()
        return [r[0] for r in results]

    outputs = asyncio.run(scenario())
    assert [o["y"].tolist() for o in outputs] == [
        [0],
        [10, 20, 30],
        [40, 50],
        [60, 70, 80, 90, 100],
        [110, 120, 130, 140, 150, 160, 170, 180, 190],
    ]
    assert max(calls) <= 6
    assert sum(calls) == 20


def test_submitting_past_the_queue_bound_is_refused() -> None:
    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=2, max_enqueued_batches=1, batch_timeout_micros=50_000)
        batcher = Batcher(lambda inputs: inputs, params)
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros(2)}, 2))
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="queue is full"):
            await batcher.submit({"x": np.zeros(1)}, 1)
        await first
        batcher.close()

    asyncio.run(scenario())


def test_a_request_larger_than_the_whole_queue_is_refused_as_invalid() -> None:
    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=2, max_enqueued_batches=2)
        batcher = Batcher(lambda inputs: inputs, params)
        with pytest.raises(InvalidArgument, match=r"5 rows, more than .* \(4: max_enqueued_batches"):
            await batcher.submit({"x": np.zeros(5)}, 5)
        assert batcher.waiting_rows == 0
        assert (await batcher.submit({"x": np.arange(4.0)}, 4))[0]["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
        batcher.close()

    asyncio.run(scenario())


def test_the_parts_of_a_split_request_are_queued_together() -> None:
    """Once a request larger than a batch is admitted, a request that comes after it cannot take
    the room of one of its parts."""

    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=2, max_enqueued_batches=2, batch_timeout_micros=50_000)
        batcher = Batcher(lambda inputs: {"y": inputs["x"] * 10}, params)
        large = asyncio.ensure_future(batcher.submit({"x": np.arange(4.0)}, 4))
        small = asyncio.ensure_future(batcher.submit({"x": np.ones(1)}, 1))
        large_result, small_result = await asyncio.gather(large, small, return_exceptions=True)
        batcher.close()
        assert isinstance(large_result, tuple)
        assert large_result[0]["y"].tolist() == [0.0, 10.0, 20.0, 30.0]
        assert isinstance(small_result, Unavailable)

    asyncio.run(scenario())


def test_when_a_part_of_a_split_request_fails_the_parts_not_started_are_withdrawn() -> None:
    calls: list[list[float]] = []
    release = threading.Event()

    def predict(inputs: Tensors) -> Tensors:
        calls.append(inputs["x"].tolist())
        if inputs["x"][0] < 0:
            raise ValueError("the first part fails")
        if inputs["x"][0] == 5:
            release.wait(10)
        return {"y": inputs["x"]}

    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=2, num_batch_threads=1)
        batcher = Batcher(predict, params)
        with pytest.raises(ValueError, match="first part fails"):
            await batcher.submit({"x": np.array([-1.0, -1.0, 5.0, 5.0, 6.0, 6.0])}, 6)
        # The second part may have started on the thread already; the third has not.
        assert batcher.waiting_rows == 0
        release.set()
        await asyncio.wait_for(batcher.submit({"x": np.array([7.0])}, 1), 10)  # after the third
        batcher.close()

    asyncio.run(scenario())
    assert calls[0] == [-1.0, -1.0]
    assert calls[-1] == [7.0]
    assert [6.0, 6.0] not in calls


def test_an_idle_batcher_runs_a_lone_request_at_once_and_merges_those_that_wait() -> None:
    """No batch running: the request goes now, whatever the timeout. While one runs, the next
    requests wait and go together when it ends."""
    sizes: list[int] = []
    first_batch_may_end = threading.Event()

    def predict(inputs: Tensors) -> Tensors:
        sizes.append(len(inputs["x"]))
        if len(sizes) == 1:
            first_batch_may_end.wait(10)
        return {"y": inputs["x"]}

    async def scenario() -> None:
        hour = 3_600_000_000
        params = BatchingParameters(max_batch_size=8, batch_timeout_micros=hour, num_batch_threads=1)
        batcher = Batcher(predict, params)
        lone = asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1))
        while not sizes:  # the first batch started without waiting for the hour-long timeout
            await asyncio.sleep(0.001)
        later = [asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1)) for _ in range(3)]
        await asyncio.sleep(0.01)
        first_batch_may_end.set()
        await asyncio.wait_for(asyncio.gather(lone, *later), timeout=10)
        batcher.close()

    asyncio.run(scenario())
    assert sizes == [1, 3]


def test_a_request_the_model_rejects_fails_alone_and_its_batch_neighbours_are_answered() -> None:
    """One client's bad input must not fail the other clients' requests batched with it: a batch
    the model fails is computed again one request at a time."""
    calls: list[list[float]] = []
    first_may_end = threading.Event()

    def predict(inputs: Tensors) -> Tensors:
        calls.append(inputs["x"].tolist())
        if len(calls) == 1:
            first_may_end.wait(10)
        if (inputs["x"] < 0).any():
            raise InvalidArgument("x must not be negative")
        return {"y": inputs["x"] * 10}

    async def scenario() -> list[object]:
        params = BatchingParameters(max_batch_size=8, batch_timeout_micros=3_600_000_000, num_batch_threads=1)
        batcher = Batcher(predict, params)
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1))
        while not calls:
            await asyncio.sleep(0.001)
        values = ([1.0], [-1.0, 2.0], [3.0, 4.0])  # queued while the first runs: one batch
        later = [asyncio.ensure_future(batcher.submit({"x": np.array(v)}, len(v))) for v in values]
        await asyncio.sleep(0.01)
        first_may_end.set()
        results = await asyncio.wait_for(asyncio.gather(first, *later, return_exceptions=True), 10)
        batcher.close()
        return results

    _, good, bad, other = asyncio.run(scenario())
    assert calls == [[0.0], [1.0, -1.0, 2.0, 3.0, 4.0], [1.0], [-1.0, 2.0], [3.0, 4.0]]
    assert isinstance(good, tuple)
    assert isinstance(other, tuple)
    assert (good[0]["y"].tolist(), good[3]) == ([10.0], 1)  # computed alone: a batch of 1 row
    assert (other[0]["y"].tolist(), other[3]) == ([30.0, 40.0], 2)
    assert isinstance(bad, InvalidArgument)
    assert "negative" in bad.message


class _Held:
    """A model that records the rows of ``x`` of each call and holds its calls (the first only,
    with ``first_only``) until ``release`` is set; ``entered`` is set when a call begins."""

    def __init__(self, first_only: bool = False) -> None:
        self.calls: list[list[float]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self._first_only = first_only

    def __call__(self, inputs: Tensors) -> Tensors:
        self.calls.append(inputs["x"].tolist())
        self.entered.set()
        if not self._first_only or len(self.calls) == 1:
            self.release.wait(10)
        return {"y": inputs["x"]}


def test_a_cancelled_split_request_frees_every_part_not_started() -> None:
    model = _Held()

    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=2, max_enqueued_batches=3, num_batch_threads=1)
        batcher = Batcher(model, params)
        large = asyncio.ensure_future(batcher.submit({"x": np.arange(6.0)}, 6))
        await _until_set(model.entered)  # the first part is computing
        large.cancel()
        await asyncio.gather(large, return_exceptions=True)
        assert batcher.waiting_rows == 0
        small = asyncio.ensure_future(batcher.submit({"x": np.full(4, 9.0)}, 4))  # room for it
        await asyncio.sleep(0)
        model.release.set()
        assert (await asyncio.wait_for(small, 10))[0]["y"].tolist() == [9.0] * 4
        batcher.close()

    asyncio.run(scenario())
    assert model.calls == [[0.0, 1.0], [9.0, 9.0], [9.0, 9.0]]


@pytest.mark.parametrize("handed", [False, True], ids=["in the queue", "in a batch waiting for a thread"])
def test_a_cancelled_submission_frees_its_slot_at_once_and_is_never_computed(handed: bool) -> None:
    model = _Held()

    async def scenario() -> None:
        # One row a batch: the queued request is a full batch, handed to the busy thread at once.
        # Two: it is not full, and waits in the queue. Either way it holds the queue's one batch.
        size = 1 if handed else 2
        params = BatchingParameters(max_batch_size=size, max_enqueued_batches=1, num_batch_threads=1)
        batcher = Batcher(model, params)
        running = asyncio.ensure_future(batcher.submit({"x": np.ones(size)}, size))
        await _until_set(model.entered)  # computing now
        queued = asyncio.ensure_future(batcher.submit({"x": np.array([2.0])}, 1))
        await asyncio.sleep(0.01)
        assert (batcher.queued_rows, batcher.waiting_rows) == (0 if handed else 1, 1)
        with pytest.raises(Unavailable, match="queue is full"):
            await batcher.submit({"x": np.full(size, 9.0)}, size)
        queued.cancel()
        await asyncio.sleep(0)
        assert batcher.waiting_rows == 0  # the slot is free while the model is still busy
        replacement = asyncio.ensure_future(batcher.submit({"x": np.array([3.0])}, 1))  # not refused
        model.release.set()
        await asyncio.wait_for(asyncio.gather(running, replacement), 10)
        batcher.close()

    asyncio.run(scenario())
    assert model.calls == [[1.0] * (1 if handed else 2), [3.0]]


def test_a_full_batch_is_handed_to_the_threads_at_once_and_taken_up_without_the_loop() -> None:
    """While every thread computes, a full batch waits for a thread, not for the event loop: the
    thread that finishes takes it up even while the loop is blocked."""
    model = _Held(first_only=True)

    async def scenario() -> None:
        hour = 3_600_000_000
        params = BatchingParameters(max_batch_size=2, batch_timeout_micros=hour, num_batch_threads=1)
        batcher = Batcher(model, params)
        first = asyncio.ensure_future(batcher.submit({"x": np.array([1.0, 1.0])}, 2))
        await _until_set(model.entered)
        second = asyncio.ensure_future(batcher.submit({"x": np.array([2.0, 2.0])}, 2))
        await asyncio.sleep(0.01)  # the batching loop turns: the full batch goes to the threads
        assert batcher.queued_rows == 0
        model.release.set()
        time.sleep(0.5)  # block the event loop: only the thread can start the second batch
        assert model.calls == [[1.0, 1.0], [2.0, 2.0]]
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        batcher.close()

    asyncio.run(scenario())


def test_full_batches_waiting_for_a_thread_count_against_the_queue_bound() -> None:
    model = _Held()

    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=2, max_enqueued_batches=2, num_batch_threads=1)
        batcher = Batcher(model, params)
        accepted = [asyncio.ensure_future(batcher.submit({"x": np.zeros(2)}, 2))]
        await _until_set(model.entered)
        for _ in range(2):  # one computing, two waiting for the thread: four rows of four
            accepted.append(asyncio.ensure_future(batcher.submit({"x": np.zeros(2)}, 2)))
            await asyncio.sleep(0.01)
        assert (batcher.queued_rows, batcher.waiting_rows) == (0, 4)
        with pytest.raises(Unavailable, match=r"queue is full \(4 of 4 rows queued\)"):
            await batcher.submit({"x": np.zeros(1)}, 1)
        model.release.set()
        await asyncio.wait_for(asyncio.gather(*accepted), 10)
        await batcher.submit({"x": np.zeros(1)}, 1)  # room again
        batcher.close()

    asyncio.run(scenario())


def test_a_batch_whose_deadlines_passed_while_it_waited_for_a_thread_is_not_computed() -> None:
    model = _Held(first_only=True)

    async def scenario() -> None:
        batcher = Batcher(model, BatchingParameters(max_batch_size=1, num_batch_threads=1))
        first = asyncio.ensure_future(batcher.submit({"x": np.array([1.0])}, 1))
        await _until_set(model.entered)
        deadline = time.monotonic() + 0.2
        late = asyncio.ensure_future(batcher.submit({"x": np.array([2.0])}, 1, deadline))
        await asyncio.sleep(0.01)
        assert (batcher.queued_rows, batcher.waiting_rows) == (0, 1)  # handed to the thread
        await asyncio.sleep(deadline - time.monotonic() + 0.05)  # and past its deadline there
        model.release.set()
        await first
        with pytest.raises(DeadlineExceeded, match="before its batch started"):
            await asyncio.wait_for(late, 10)
        batcher.close()

    asyncio.run(scenario())
    assert model.calls == [[1.0]]


def test_in_adaptive_mode_one_full_batch_per_thread_waits_and_the_rest_stay_queued() -> None:
    """Batches closed now have today's target size: in adaptive mode few may wait for a thread,
    so that the queue's requests are batched at the size the model is measured to take."""
    model = _Held()

    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=8, num_batch_threads=1, target_p99_ms=60_000)
        batcher = Batcher(model, params)
        assert batcher.target_batch_size == 1
        requests = [asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1)) for _ in range(5)]
        await _until_set(model.entered)
        await asyncio.sleep(0.01)
        # one computing, one waiting for the thread, three in the queue
        assert (batcher.queued_rows, batcher.waiting_rows) == (3, 4)
        model.release.set()
        await asyncio.wait_for(asyncio.gather(*requests), 10)
        batcher.close()

    asyncio.run(scenario())
    assert sum(len(call) for call in model.calls) == 5


def test_requests_taken_for_a_batch_that_has_not_started_still_hold_their_slots() -> None:
    """Between the batching loop taking requests and a thread starting their batch, they count."""
    model = _Held()

    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=1, max_enqueued_batches=2, num_batch_threads=1)
        batcher = Batcher(model, params)
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1))
        await _until_set(model.entered)  # computing
        accepted = [asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1)) for _ in range(2)]
        await asyncio.sleep(0)  # both queued: the two slots are taken; the batching loop wakes
        late = [asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1)) for _ in range(2)]
        await asyncio.sleep(0.02)
        for refused in late:
            with pytest.raises(Unavailable, match=r"queue is full \(2 of 2 rows queued\)"):
                await refused
        assert batcher.waiting_rows == 2
        model.release.set()
        await asyncio.wait_for(asyncio.gather(first, *accepted), 10)
        assert batcher.waiting_rows == 0
        batcher.close()

    asyncio.run(scenario())


def test_batches_waiting_for_a_thread_are_bounded_even_when_their_requests_are_withdrawn() -> None:
    """A withdrawn request frees its slot at once, but its batch keeps its inputs until a thread
    reaches it: so at most max_enqueued_batches batches wait, and the rest of the requests stay
    in the queue, whence a withdrawn one leaves with its memory."""
    model = _Held()

    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=1, max_enqueued_batches=2, num_batch_threads=1)
        batcher = Batcher(model, params)
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1))
        await _until_set(model.entered)
        inputs = []
        for _ in range(20):  # each a full batch, whose caller gives up
            x = np.zeros(1)
            inputs.append(weakref.ref(x))
            request = asyncio.ensure_future(batcher.submit({"x": x}, 1))
            del x
            await asyncio.sleep(0.001)
            request.cancel()
            await asyncio.sleep(0.001)
        del request  # a cancelled task keeps its coroutine's frame
        gc.collect()
        alive = sum(ref() is not None for ref in inputs)
        assert alive <= 2, alive
        model.release.set()
        await asyncio.wait_for(first, 10)
        batcher.close()

    asyncio.run(scenario())


def test_a_finished_batch_is_freed_without_the_cycle_collector() -> None:
    """Requests and their batch go by reference counting: the collector's full passes over
    per-request garbage would pause the event loop."""

    async def scenario() -> list[weakref.ref[np.ndarray]]:
        batcher = Batcher(lambda inputs: {"y": inputs["x"] * 2}, BatchingParameters(max_batch_size=4))
        inputs = []
        for _ in range(3):
            x = np.zeros(2)
            inputs.append(weakref.ref(x))
            await batcher.submit({"x": x}, 2)
            del x
        batcher.close()
        for thread in threading.enumerate():  # a thread keeps its last work item until it ends
            if thread.name.startswith("inferd-batch"):
                thread.join(10)
        return inputs

    gc.disable()
    try:
        inputs = asyncio.run(scenario())
        assert [ref() is None for ref in inputs] == [True, True, True]
    finally:
        gc.enable()


def test_closing_a_batcher_ends_its_threads() -> None:
    def batch_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("inferd-batch")]

    async def scenario() -> None:
        batcher = Batcher(lambda inputs: inputs, BatchingParameters(max_batch_size=4, num_batch_threads=2))
        before = set(batch_threads())
        await batcher.submit({"x": np.zeros(1)}, 1)
        mine = [t for t in batch_threads() if t not in before]
        assert mine
        batcher.close()
        for thread in mine:
            thread.join(10)
            assert not thread.is_alive()

    asyncio.run(scenario())


def _batch_threads(seconds_per_row: float, rows: list[int], costs: CallCosts) -> list[str]:
    """The threads that computed lone batches of ``rows`` rows, in turn, with a predict taking
    ``seconds_per_row`` per row."""
    threads: list[str] = []

    def predict(inputs: Tensors) -> Tensors:
        threads.append(threading.current_thread().name)
        until = time.perf_counter() + seconds_per_row * len(inputs["x"])
        while time.perf_counter() < until:  # busy: a sleep would add the timer slack (~50 us)
            pass
        return {"y": inputs["x"]}

    async def scenario() -> None:
        batcher = Batcher(predict, BatchingParameters(max_batch_size=64), costs=costs)
        for n in rows:
            await batcher.submit({"x": np.zeros(n)}, n)
        batcher.close()

    asyncio.run(scenario())
    return threads


def test_a_fast_signatures_batches_run_on_the_event_loop_and_a_slow_ones_on_threads() -> None:
    loop_thread = threading.main_thread().name
    fast = _batch_threads(0.0, [4] * 50, CallCosts())
    assert fast[0].startswith("inferd-batch")  # unmeasured: on an inference thread
    # measured fast: inline (a loaded machine may stretch a few calls past the bound)
    assert fast.count(loop_thread) > 25
    slow = _batch_threads(INLINE_PREDICT_S * 4, [1] * 4, CallCosts())
    assert all(name.startswith("inferd-batch") for name in slow)


def test_a_batch_too_large_for_the_loop_goes_to_a_thread_and_the_costs_are_shared() -> None:
    costs = CallCosts()
    costs.add(1, INLINE_PREDICT_S / 10)  # as after a fast unbatched call of the signature
    threads = _batch_threads(INLINE_PREDICT_S / 8, [2, 64], costs)
    assert threads[0] == threading.main_thread().name  # judged by the unbatched call already
    assert threads[1].startswith("inferd-batch")  # 64 rows at a tenth of the bound each: 6.4 times it


def test_a_batch_beside_one_on_a_thread_goes_to_a_thread_too() -> None:
    """Only a batch running alone may take the event loop: beside one on a thread it could wait
    for the model's lock and hold the loop meanwhile."""
    costs = CallCosts()
    threads: list[str] = []
    first_may_end = threading.Event()

    def predict(inputs: Tensors) -> Tensors:
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            first_may_end.wait(10)
        return {"y": inputs["x"]}

    async def scenario() -> None:
        params = BatchingParameters(max_batch_size=1, num_batch_threads=2)
        batcher = Batcher(predict, params, costs=costs)
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1))
        while not threads:  # unmeasured: the first batch went to a thread
            await asyncio.sleep(0.001)
        costs.add(1, INLINE_PREDICT_S / 10)  # the signature is fast from now on
        await asyncio.wait_for(batcher.submit({"x": np.zeros(1)}, 1), 10)
        first_may_end.set()
        await first
        await batcher.submit({"x": np.zeros(1)}, 1)  # alone again
        batcher.close()

    asyncio.run(scenario())
    assert [name.startswith("inferd-batch") for name in threads] == [True, True, False]


def test_padding_fills_string_inputs_with_empty_strings() -> None:
    """A framework refuses a string tensor holding numbers (TensorFlow: ``Unsupported object type
    numpy.int64``), so padded rows and padded widths of string inputs hold empty strings."""
    seen: list[np.ndarray] = []

    def predict(inputs: Tensors) -> Tensors:
        seen.append(inputs["text"])
        if not all(isinstance(item, str | bytes) for item in inputs["text"].flat):
            raise TypeError("a string tensor holds a number")
        return {"length": np.array([[len(item) for item in row] for row in inputs["text"]])}

    async def scenario() -> list[Tensors]:
        params = BatchingParameters(
            max_batch_size=4,
            allowed_batch_sizes=(4,),
            num_batch_threads=1,
            pad_variable_length_inputs=True,
            batch_timeout_micros=50_000,
        )
        batcher = Batcher(predict, params)
        results = await asyncio.gather(
            batcher.submit({"text": np.array([["ab"]], dtype=object)}, 1),
            batcher.submit({"text": np.array([["a", "bcd"]], dtype=object)}, 1),
        )
        batcher.close()
        return [r[0] for r in results]

    outputs = asyncio.run(scenario())
    assert [o["length"].tolist() for o in outputs] == [[[2, 0]], [[1, 3]]]
    assert [batch.tolist() for batch in seen] == [[["ab", ""], ["a", "bcd"], ["", ""], ["", ""]]]


def test_with_padding_inputs_of_another_rank_go_in_their_own_batch() -> None:
    """Runtimes that judge shapes themselves (TensorFlow) get inputs of any rank: one of another
    rank than its neighbours' cannot be padded to theirs, and must not fail them."""

    def predict(inputs: Tensors) -> Tensors:
        if inputs["x"].ndim != 2:
            raise InvalidArgument("x must be a matrix")
        return {"y": inputs["x"].sum(axis=1)}

    async def scenario() -> tuple[tuple[Tensors, float, float, int] | BaseException, ...]:
        params = BatchingParameters(
            max_batch_size=8,
            num_batch_threads=1,
            pad_variable_length_inputs=True,
            batch_timeout_micros=50_000,
        )
        batcher = Batcher(predict, params)
        return await asyncio.gather(
            batcher.submit({"x": np.ones((1, 2))}, 1),
            batcher.submit({"x": np.ones((1, 3))}, 1),
            batcher.submit({"x": np.ones(1)}, 1),
            batcher.submit({"x": np.ones((1, 1))}, 1),
            return_exceptions=True,
        )

    first, second, wrong, fourth = asyncio.run(scenario())
    assert isinstance(wrong, InvalidArgument)
    answered = [r[0]["y"].tolist() for r in (first, second, fourth) if not isinstance(r, BaseException)]
    assert answered == [[2.0], [3.0], [1.0]]


def test_a_split_requests_parts_padded_to_different_neighbours_are_joined() -> None:
    """With pad_variable_length_inputs, one part of a split request may share a batch with a wider
    request and another not: their outputs differ in width, and are joined padded to the widest."""

    def predict(inputs: Tensors) -> Tensors:
        return {"y": inputs["x"] * 2}

    async def scenario() -> list[Tensors]:
        params = BatchingParameters(
            max_batch_size=4,
            num_batch_threads=1,
            pad_variable_length_inputs=True,
            batch_timeout_micros=50_000,
        )
        batcher = Batcher(predict, params)
        results = await asyncio.gather(
            batcher.submit({"x": np.ones((6, 3))}, 6), batcher.submit({"x": np.ones((2, 5))}, 2)
        )
        batcher.close()
        return [r[0] for r in results]

    split, wide = asyncio.run(scenario())
    assert split["y"].tolist() == [[2.0, 2.0, 2.0, 0.0, 0.0]] * 6
    assert wide["y"].tolist() == [[2.0] * 5] * 2
