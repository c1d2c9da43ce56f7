import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from inferd.batching import Aimd, Batcher
from inferd.config import BatchingParameters
from inferd.errors import ConfigError, Unavailable
from inferd.placement import INLINE_PREDICT_S, CallCosts
from inferd.types import Tensors


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
        with ThreadPoolExecutor(2) as pool:
            params = BatchingParameters(max_batch_size=6, batch_timeout_micros=20_000, num_batch_threads=1)
            batcher = Batcher(predict, params, pool)
            sizes = [1, 3, 2, 5, 9]
            start = np.cumsum([0, *sizes])
            results = await asyncio.gather(
                *(batcher.submit({"x": np.arange(a, a + n)}, n) for a, n in zip(start, sizes, strict=False))
            )
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
        with ThreadPoolExecutor(1) as pool:
            params = BatchingParameters(max_batch_size=2, max_enqueued_batches=1, batch_timeout_micros=50_000)
            batcher = Batcher(lambda inputs: inputs, params, pool)
            first = asyncio.ensure_future(batcher.submit({"x": np.zeros(2)}, 2))
            await asyncio.sleep(0)
            with pytest.raises(Unavailable, match="queue is full"):
                await batcher.submit({"x": np.zeros(1)}, 1)
            await first

    asyncio.run(scenario())


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
        with ThreadPoolExecutor(1) as pool:
            hour = 3_600_000_000
            params = BatchingParameters(max_batch_size=8, batch_timeout_micros=hour, num_batch_threads=1)
            batcher = Batcher(predict, params, pool)
            lone = asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1))
            while not sizes:  # the first batch started without waiting for the hour-long timeout
                await asyncio.sleep(0.001)
            later = [asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1)) for _ in range(3)]
            await asyncio.sleep(0.01)
            first_batch_may_end.set()
            await asyncio.wait_for(asyncio.gather(lone, *later), timeout=10)

    asyncio.run(scenario())
    assert sizes == [1, 3]


def test_a_cancelled_submission_leaves_the_queue_at_once_and_is_never_computed() -> None:
    release = threading.Event()
    computed: list[list[int]] = []

    def predict(inputs: Tensors) -> Tensors:
        release.wait(5)
        computed.append(inputs["x"].tolist())
        return {"y": inputs["x"]}

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            params = BatchingParameters(max_batch_size=1, max_enqueued_batches=1, num_batch_threads=1)
            batcher = Batcher(predict, params, pool)
            running = asyncio.ensure_future(batcher.submit({"x": np.array([1])}, 1))
            await asyncio.sleep(0.05)  # computing now
            queued = asyncio.ensure_future(batcher.submit({"x": np.array([2])}, 1))
            await asyncio.sleep(0.01)
            assert batcher.queued_rows == 1
            queued.cancel()
            await asyncio.sleep(0)
            assert batcher.queued_rows == 0  # the slot is free while the model is still busy
            replacement = asyncio.ensure_future(batcher.submit({"x": np.array([3])}, 1))  # not refused
            release.set()
            await asyncio.gather(running, replacement)

    asyncio.run(scenario())
    assert computed == [[1], [3]]


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
        with ThreadPoolExecutor(1, thread_name_prefix="infer") as pool:
            batcher = Batcher(predict, BatchingParameters(max_batch_size=64), pool, costs=costs)
            for n in rows:
                await batcher.submit({"x": np.zeros(n)}, n)

    asyncio.run(scenario())
    return threads


def test_a_fast_signatures_batches_run_on_the_event_loop_and_a_slow_ones_on_threads() -> None:
    loop_thread = threading.main_thread().name
    fast = _batch_threads(0.0, [4] * 50, CallCosts())
    assert fast[0].startswith("infer")  # unmeasured: on an inference thread
    # measured fast: inline (a loaded machine may stretch a few calls past the bound)
    assert fast.count(loop_thread) > 25
    slow = _batch_threads(INLINE_PREDICT_S * 4, [1] * 4, CallCosts())
    assert all(name.startswith("infer") for name in slow)


def test_a_batch_too_large_for_the_loop_goes_to_a_thread_and_the_costs_are_shared() -> None:
    costs = CallCosts()
    costs.add(1, INLINE_PREDICT_S / 10)  # as after a fast unbatched call of the signature
    threads = _batch_threads(INLINE_PREDICT_S / 8, [2, 64], costs)
    assert threads[0] == threading.main_thread().name  # judged by the unbatched call already
    assert threads[1].startswith("infer")  # 64 rows at a tenth of the bound each: 6.4 times it


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
        with ThreadPoolExecutor(2, thread_name_prefix="infer") as pool:
            params = BatchingParameters(max_batch_size=1, num_batch_threads=2)
            batcher = Batcher(predict, params, pool, costs=costs)
            first = asyncio.ensure_future(batcher.submit({"x": np.zeros(1)}, 1))
            while not threads:  # unmeasured: the first batch went to a thread
                await asyncio.sleep(0.001)
            costs.add(1, INLINE_PREDICT_S / 10)  # the signature is fast from now on
            await asyncio.wait_for(batcher.submit({"x": np.zeros(1)}, 1), 10)
            first_may_end.set()
            await first
            await batcher.submit({"x": np.zeros(1)}, 1)  # alone again

    asyncio.run(scenario())
    assert [name.startswith("infer") for name in threads] == [True, True, False]
