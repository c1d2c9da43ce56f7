"""Batcher: merges concurrent requests for one model version into one ``predict`` call.

Requests queue up to ``max_enqueued_batches * max_batch_size`` rows; past that, ``submit``
raises ``Unavailable`` at once (load shedding, as TF Serving and Triton answer a full queue). A
batch closes when it holds the target number of rows, when its oldest request waited the batch
timeout, or at once when no batch is running: waiting only pays while the model is busy and
more requests are bound to arrive, so a lone request is never delayed. A batch runs on the
executor while the next one forms, or on the event loop when no other batch of the queue is
running and the signature's recent calls say the batch takes at most
``placement.INLINE_PREDICT_S`` (as an unbatched call may); at most ``num_batch_threads``
batches run at once. Requests whose deadline passed are dropped before they are computed; a
request whose caller went away (its ``submit`` cancelled) leaves the queue at once, freeing its
slot. A request larger than ``max_batch_size`` is split into batches of that size and its
outputs joined again.

In adaptive mode (``target_p99_ms``) the target batch size follows AIMD on the measured batch
latency, as in Clipper: it grows by one row after a full batch that ran within half the
objective, and shrinks by 10% after a batch that did not. Half, because a request may wait for
a running batch to finish and then run in its own. The batch wait is what is left of the
objective after two batch latencies, halved for headroom, and never more than the timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from inferd.config import BatchingParameters
from inferd.errors import DeadlineExceeded, Internal, Unavailable
from inferd.placement import CallCosts
from inferd.types import Tensors

_DECREASE = 0.9
_SMOOTHING = 0.2


class Aimd:
    """Latency-aware batch size and wait (see the module docstring)."""

    def __init__(self, target_p99_ms: float, max_batch_size: int, max_wait_s: float) -> None:
        self._budget_s = target_p99_ms / 1000
        self._max_batch = max_batch_size
        self._max_wait_s = max_wait_s
        self._latency_s = 0.0
        self.batch_size = 1
        self.wait_s = 0.0

    def observe(self, rows: int, latency_s: float) -> None:
        self._latency_s += _SMOOTHING * (latency_s - self._latency_s) if self._latency_s else latency_s
        if latency_s > self._budget_s / 2:
            self.batch_size = max(1, int(self.batch_size * _DECREASE))
        elif rows >= self.batch_size:
            self.batch_size = min(self._max_batch, self.batch_size + 1)
        self.wait_s = min(self._max_wait_s, max(0.0, (self._budget_s - 2 * self._latency_s) / 2))


@dataclass(slots=True, eq=False)
class _Item:
    inputs: Tensors
    rows: int
    future: asyncio.Future[tuple[Tensors, float, float, int]]
    enqueued: float
    deadline: float | None


class Batcher:
    """One bounded queue and batching loop for one (model version, signature).

    ``predict`` runs on ``executor``, or on the event loop when ``costs`` (the signature's recent
    calls, which record every batch) say a batch of its rows is fast; ``on_batch(rows,
    latency_s)`` is told of every batch. Use from the event loop's thread.
    """

    def __init__(
        self,
        predict: Callable[[Tensors], Tensors],
        params: BatchingParameters,
        executor: Executor,
        on_batch: Callable[[int, float], None] = lambda rows, latency_s: None,
        costs: CallCosts | None = None,
    ) -> None:
        self._predict = predict
        self._costs = costs
        self._params = params
        self._executor = executor
        self._on_batch = on_batch
        self._timeout_s = params.batch_timeout_micros / 1e6
        self.aimd = (
            Aimd(params.target_p99_ms, params.max_batch_size, self._timeout_s)
            if params.target_p99_ms is not None
            else None
        )
        self._capacity = params.max_enqueued_batches * params.max_batch_size
        self._queue: deque[_Item] = deque()
        self.queued_rows = 0
        self._running = 0
        self._worker: asyncio.Task[None] | None = None
        self._executing: set[asyncio.Task[None]] = set()
        self._waiter: asyncio.Future[None] | None = None

    @property
    def target_batch_size(self) -> int:
        return self.aimd.batch_size if self.aimd else self._params.max_batch_size

    @property
    def wait_s(self) -> float:
        return self.aimd.wait_s if self.aimd else self._timeout_s

    async def submit(
        self, inputs: Tensors, rows: int, deadline: float | None = None
    ) -> tuple[Tensors, float, float, int]:
        """Queue ``rows`` rows (axis 0 of every input) and wait for their outputs.

        Returns:
            The outputs for exactly these rows, the seconds spent queued, the seconds of the
            predict call that computed them, and the rows of the batch it computed (these and
            other requests', padding not counted; the largest when they were split up).

        Raises:
            Unavailable: the queue is full.
        """
        limit = self._params.max_batch_size
        if self.queued_rows + rows > self._capacity:
            raise Unavailable(
                f"The batch scheduling queue is full ({self.queued_rows} of {self._capacity} rows "
                "queued); retry later"
            )
        if rows > limit:
            parts = await asyncio.gather(
                *(
                    self.submit(
                        {k: v[i : i + limit] for k, v in inputs.items()}, min(limit, rows - i), deadline
                    )
                    for i in range(0, rows, limit)
                )
            )
            outputs = {name: np.concatenate([p[0][name] for p in parts]) for name in parts[0][0]}
            return outputs, max(p[1] for p in parts), sum(p[2] for p in parts), max(p[3] for p in parts)
        loop = asyncio.get_running_loop()
        item = _Item(inputs, rows, loop.create_future(), time.monotonic(), deadline)
        self._queue.append(item)
        self.queued_rows += rows
        if self._worker is None:
            self._worker = loop.create_task(self._run())
        elif self.queued_rows >= self.target_batch_size and self._waiter and not self._waiter.done():
            self._waiter.set_result(None)
        try:
            return await item.future
        except asyncio.CancelledError:
            self._withdraw(item)
            raise

    def _withdraw(self, item: _Item) -> None:
        """Free a cancelled request's queue slot now, unless a batch already took it."""
        try:
            self._queue.remove(item)
        except ValueError:
            return
        self.queued_rows -= item.rows

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                deadline = self._queue[0].enqueued + self.wait_s
                while (
                    self._running
                    and self.queued_rows < self.target_batch_size
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    await self._sleep(loop, remaining)
                while self._running >= self._params.num_batch_threads:
                    await self._sleep(loop, None)
                batch = self._take()
                if batch:
                    self._running += 1
                    task = loop.create_task(self._execute(batch))
                    self._executing.add(task)
                    task.add_done_callback(self._executing.discard)
        finally:
            self._worker = None

    async def _sleep(self, loop: asyncio.AbstractEventLoop, timeout_s: float | None) -> None:
        """Until the timeout, a full batch, or a finished batch, whichever comes first."""
        self._waiter = waiter = loop.create_future()
        handle = loop.call_later(timeout_s, _wake, waiter) if timeout_s is not None else None
        try:
            await waiter
        finally:
            if handle:
                handle.cancel()
            self._waiter = None

    def _take(self) -> list[_Item]:
        """Pop the requests of the next batch, dropping cancelled and expired ones."""
        batch: list[_Item] = []
        rows, target, now = 0, self.target_batch_size, time.monotonic()
        shape = None
        while self._queue:
            item = self._queue[0]
            if item.future.done() or (item.deadline is not None and now > item.deadline):
                self._queue.popleft()
                self.queued_rows -= item.rows
                if not item.future.done():
                    item.future.set_exception(
                        DeadlineExceeded("the request's deadline passed while it waited for a batch")
                    )
                continue
            item_shape = {k: v.shape[1:] for k, v in item.inputs.items()}
            fits = shape is None or item_shape == shape or self._params.pad_variable_length_inputs
            if batch and (rows + item.rows > target or not fits):
                break
            shape = shape or item_shape
            self._queue.popleft()
            self.queued_rows -= item.rows
            batch.append(item)
            rows += item.rows
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            inputs, padded = self._concatenate(batch)
            # Alone only: beside a batch on a thread, one on the loop could wait for the model's lock.
            if self._costs is not None and self._running == 1 and self._costs.inline(padded):
                outputs, predict_s = _timed(self._predict, inputs)
            else:
                outputs, predict_s = await loop.run_in_executor(self._executor, _timed, self._predict, inputs)
            if self._costs is not None:
                self._costs.add(padded, predict_s)
            latency_s = time.monotonic() - started
            rows = sum(item.rows for item in batch)
            self._on_batch(rows, latency_s)
            if self.aimd:
                self.aimd.observe(rows, latency_s)
            offset = 0
            for item in batch:
                part = {}
                for name, value in outputs.items():
                    if value.ndim == 0 or len(value) != padded:
                        raise Internal(f"output {name!r} has {value.shape[:1]} rows for a batch of {padded}")
                    part[name] = value[offset : offset + item.rows]
                offset += item.rows
                if not item.future.done():
                    item.future.set_result((part, started - item.enqueued, latency_s, rows))
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._running -= 1
            if self._waiter and not self._waiter.done():
                self._waiter.set_result(None)

    def _concatenate(self, batch: list[_Item]) -> tuple[Tensors, int]:
        rows = sum(item.rows for item in batch)
        padded = next((size for size in self._params.allowed_batch_sizes if size >= rows), rows)
        merged = {}
        for name in batch[0].inputs:
            parts = [item.inputs[name] for item in batch]
            if self._params.pad_variable_length_inputs:
                widest = np.max([p.shape[1:] for p in parts], axis=0) if parts[0].ndim > 1 else ()
                parts = [_pad_to(p, (p.shape[0], *widest)) for p in parts]
            value = np.concatenate(parts) if len(parts) > 1 else parts[0]
            if padded > rows:
                value = _pad_to(value, (padded, *value.shape[1:]))
            merged[name] = value
        return merged, padded


def _timed(predict: Callable[[Tensors], Tensors], inputs: Tensors) -> tuple[Tensors, float]:
    """``predict(inputs)`` and the seconds it took, timed where it runs."""
    started = time.perf_counter()
    outputs = predict(inputs)
    return outputs, time.perf_counter() - started


def _pad_to(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if value.shape == tuple(shape):
        return value
    return np.pad(value, [(0, int(want) - have) for want, have in zip(shape, value.shape, strict=True)])


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
