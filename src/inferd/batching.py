"""Batcher: merges concurrent requests for one model version into one ``predict`` call.

Requests queue up to ``max_enqueued_batches * max_batch_size`` rows, counting those of batches
not started yet; past that, ``submit`` raises ``Unavailable`` at once (load shedding, as
TF Serving and Triton answer a full queue). A batch closes when it holds the target number of
rows, when its oldest request waited the batch timeout, or at once when no batch is running:
waiting only pays while the model is busy and more requests are bound to arrive, so a lone
request is never delayed. Batches run on the batcher's own ``num_batch_threads`` threads. A full
batch is handed to them at once (up to ``max_enqueued_batches`` waiting; in adaptive mode, one
per thread), so that a thread which finishes one finds the next without waiting for the event
loop; a partial one, when a thread is free. A batch runs on the
event loop instead when no other batch of the queue is running and the signature's recent calls
say it takes at most ``placement.INLINE_PREDICT_S`` (as an unbatched call may). Requests whose
deadline passed are dropped before they are computed (when the batch is formed, and when a
thread starts it); a request whose caller went away (its ``submit`` cancelled) frees its slot at
once and is not computed unless its batch has started. A request larger than ``max_batch_size``
is split into batches of that size, queued together, and its outputs joined again (with
``pad_variable_length_inputs``, padded to the widest part's); one larger than the whole queue
is refused as invalid, since retrying would not help.

In adaptive mode (``target_p99_ms``) the target batch size follows AIMD on the measured batch
latency, as in Clipper: it grows by one row after a full batch that ran within half the
objective, and shrinks by 10% after a batch that did not. Half, because a request may wait for
a running batch to finish and then run in its own. The batch wait is what is left of the
objective after two batch latencies, halved for headroom, and never more than the timeout.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from inferd.config import BatchingParameters
from inferd.errors import DeadlineExceeded, Internal, InvalidArgument, Unavailable
from inferd.placement import CallCosts
from inferd.threads import ThreadPool
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
    batch: _Batch | None = None  # once it left the queue


@dataclass(slots=True, eq=False)
class _Batch:
    """Requests taken from the queue together: ``taken`` rows, the first deadline ``expires``.
    ``started`` (``time.monotonic()``) is set where the batch is computed (a batch thread or the
    event loop), before it reads which requests are still wanted; until then, the event loop
    keeps ``rows``: the rows of the requests not withdrawn."""

    items: list[_Item]
    taken: int
    expires: float
    rows: int
    started: float | None = None


_Alone = tuple[Tensors, int, float] | Exception
"""A request of a failed batch computed alone: its outputs, rows computed (padding included) and
seconds of predict; or what the model raised."""


class Batcher:
    """One bounded queue and batching loop for one (model version, signature).

    ``predict`` runs on the batcher's threads, or on the event loop when ``costs`` (the
    signature's recent calls, which record every batch) say a batch of its rows is fast;
    ``on_batch(rows, latency_s)`` is told of every batch. Use from the event loop's thread;
    ``close`` once no request uses it.
    """

    def __init__(
        self,
        predict: Callable[[Tensors], Tensors],
        params: BatchingParameters,
        on_batch: Callable[[int, float], None] = lambda rows, latency_s: None,
        costs: CallCosts | None = None,
    ) -> None:
        self._predict = predict
        self._costs = costs
        self._params = params
        self._threads = ThreadPool(params.num_batch_threads, "inferd-batch")
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
        self._worker: asyncio.Task[None] | None = None
        self._executing: set[asyncio.Task[None]] = set()
        self._taken: list[_Batch] = []  # taken from the queue, not finished: computing or waiting
        self._taken_rows = 0  # their rows when taken
        self._waiter: asyncio.Future[None] | None = None

    @property
    def target_batch_size(self) -> int:
        return self.aimd.batch_size if self.aimd else self._params.max_batch_size

    @property
    def waiting_rows(self) -> int:
        """Rows in the queue or in batches not started yet: what ``max_enqueued_batches`` bounds."""
        return self.queued_rows + sum(batch.rows for batch in self._taken if batch.started is None)

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
            InvalidArgument: ``rows`` is more than the queue holds.
            Unavailable: the queue is full.
        """
        if rows > self._capacity:
            raise InvalidArgument(
                f"The request has {rows} rows, more than its model's batching queue holds "
                f"({self._capacity}: max_enqueued_batches * max_batch_size); send at most "
                f"{self._capacity} rows a request"
            )
        queued = self.queued_rows
        if queued + self._taken_rows + rows > self._capacity:  # then count exactly
            queued = self.waiting_rows
        if queued + rows > self._capacity:
            raise Unavailable(
                f"The batch scheduling queue is full ({queued} of {self._capacity} rows queued); retry later"
            )
        limit = self._params.max_batch_size
        if rows > limit:
            return await self._submit_parts(inputs, rows, deadline)
        item = self._enqueue(inputs, rows, deadline)
        try:
            return await item.future
        except asyncio.CancelledError:
            self._withdraw(item)
            raise

    async def _submit_parts(
        self, inputs: Tensors, rows: int, deadline: float | None
    ) -> tuple[Tensors, float, float, int]:
        """``submit`` for more rows than a batch holds: all parts queue at once (none can be
        refused once the request is admitted), and when one fails or the caller goes away, the
        others are withdrawn."""
        limit = self._params.max_batch_size
        items = [
            self._enqueue({k: v[i : i + limit] for k, v in inputs.items()}, min(limit, rows - i), deadline)
            for i in range(0, rows, limit)
        ]
        try:
            parts = await asyncio.gather(*(item.future for item in items))
        except BaseException:  # cancelled: gather cancelled the futures; failed: the others still wait
            for item in items:
                item.future.cancel()
                if item.future.cancelled():
                    self._withdraw(item)
            raise
        join = _join_padded if self._params.pad_variable_length_inputs else np.concatenate
        outputs = {name: join([p[0][name] for p in parts]) for name in parts[0][0]}
        return outputs, max(p[1] for p in parts), sum(p[2] for p in parts), max(p[3] for p in parts)

    def _enqueue(self, inputs: Tensors, rows: int, deadline: float | None) -> _Item:
        loop = asyncio.get_running_loop()
        item = _Item(inputs, rows, loop.create_future(), time.monotonic(), deadline)
        self._queue.append(item)
        self.queued_rows += rows
        if self._worker is None:
            self._worker = loop.create_task(self._run())
        elif self.queued_rows >= self.target_batch_size and self._waiter and not self._waiter.done():
            self._waiter.set_result(None)
        return item

    def _withdraw(self, item: _Item) -> None:
        """Free a cancelled request's queue slot now, unless its batch has started. Its future
        is cancelled already, and a thread starting a batch reads the futures after it sets
        ``started``, so a batch read here as not started leaves the request out."""
        if item.batch is not None:
            if item.batch.started is None:
                item.batch.rows -= item.rows
            return
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
                    self._taken
                    and self.queued_rows < self.target_batch_size
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    await self._sleep(loop, remaining)
                while len(self._taken) >= self._batch_slots():
                    await self._sleep(loop, None)
                batch = self._take()
                if batch is not None:
                    self._taken.append(batch)
                    self._taken_rows += batch.rows
                    task = loop.create_task(self._execute(batch))
                    self._executing.add(task)
                    task.add_done_callback(self._executing.discard)
        finally:
            self._worker = None

    def _batch_slots(self) -> int:
        """How many batches may be computing or waiting for a thread when the next one goes. A
        full batch may wait for a thread, since waiting in the queue would not grow it, and a
        thread that finishes a batch then finds the next without the event loop: up to
        ``max_enqueued_batches`` of them (their withdrawn requests' slots are free, but not their
        memory), and in adaptive mode one per thread, so that few are closed at an old target."""
        threads = self._params.num_batch_threads
        if self.queued_rows < self.target_batch_size:
            return threads
        return 2 * threads if self.aimd else threads + self._params.max_enqueued_batches

    def close(self) -> None:
        """Let the batcher's threads end once idle."""
        self._threads.shutdown()

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

    def _take(self) -> _Batch | None:
        """Pop the requests of the next batch, dropping cancelled and expired ones."""
        batch = _Batch([], 0, math.inf, 0)
        target, now = self.target_batch_size, time.monotonic()
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
            fits = (
                shape is None
                or item_shape == shape
                or (self._params.pad_variable_length_inputs and _same_ranks(item_shape, shape))
            )
            if batch.items and (batch.taken + item.rows > target or not fits):
                break
            shape = shape or item_shape
            self._queue.popleft()
            self.queued_rows -= item.rows
            batch.items.append(item)
            batch.taken += item.rows
            if item.deadline is not None and item.deadline < batch.expires:
                batch.expires = item.deadline
            item.batch = batch
        batch.rows = batch.taken
        return batch if batch.items else None

    async def _execute(self, batch: _Batch) -> None:
        try:
            inputs, padded = self._concatenate(batch.items)
            # Alone only: beside a batch on a thread, one on the loop could wait for the model's lock.
            if self._costs is not None and len(self._taken) == 1 and self._costs.inline(padded):
                computed, outputs, padded, predict_s = self._compute(batch, inputs, padded)
            else:
                computed, outputs, padded, predict_s = await self._threads.run(
                    self._compute, batch, inputs, padded
                )
            assert batch.started is not None
            started = batch.started
            if isinstance(outputs, list):  # the batch failed: each request was computed alone
                self._settle_alone(computed, outputs, started)
            else:
                self._settle(computed, outputs, padded, predict_s, started)
            if len(computed) < len(batch.items):  # the others were withdrawn or expired
                expired = DeadlineExceeded("the request's deadline passed before its batch started")
                for item in batch.items:
                    if not item.future.done():
                        item.future.set_exception(expired)
        except Exception as exc:
            for item in batch.items:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            batch.items = []  # the requests point back at it: no cycle left for the collector
            self._taken.remove(batch)
            self._taken_rows -= batch.taken
            if self._waiter and not self._waiter.done():
                self._waiter.set_result(None)

    def _settle(
        self, items: list[_Item], outputs: Tensors, padded: int, predict_s: float, started: float
    ) -> None:
        """Answer the requests of a computed batch with their rows of ``outputs``.

        Raises:
            Internal: an output does not have one row per row of the batch.
        """
        latency_s = time.monotonic() - started
        rows = sum(item.rows for item in items)
        if items:
            if self._costs is not None:
                self._costs.add(padded, predict_s)
            self._on_batch(rows, latency_s)
            if self.aimd:
                self.aimd.observe(rows, latency_s)
        offset = 0
        for item in items:
            part = {}
            for name, value in outputs.items():
                _check_rows(name, value, padded)
                part[name] = value[offset : offset + item.rows]
            offset += item.rows
            if not item.future.done():
                item.future.set_result((part, started - item.enqueued, latency_s, rows))

    def _settle_alone(self, items: list[_Item], outcomes: list[_Alone], started: float) -> None:
        """Answer each request of a failed batch with what computing it alone gave."""
        for item, outcome in zip(items, outcomes, strict=True):
            if item.future.done():
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
                continue
            outputs, padded, seconds = outcome
            try:
                part = {
                    name: _check_rows(name, value, padded)[: item.rows] for name, value in outputs.items()
                }
            except Internal as error:
                item.future.set_exception(error)
                continue
            self._on_batch(item.rows, seconds)
            item.future.set_result((part, started - item.enqueued, seconds, item.rows))

    def _compute(
        self, batch: _Batch, inputs: Tensors, padded: int
    ) -> tuple[list[_Item], Tensors | list[_Alone], int, float]:
        """Predict ``inputs`` (``batch``'s, ``padded`` rows), or, when some of its requests are no
        longer wanted (withdrawn, or past their deadline), only the others'; on a batch thread
        or the event loop. When the model fails on a batch of several requests, each is computed
        alone, so that one request's bad input fails that request only.

        Returns:
            The requests computed, the outputs (or, for a failed batch, each request's outcome
            alone), the rows computed (padding included) and the seconds of predict.
        """
        batch.started = now = time.monotonic()
        items = batch.items
        if now > batch.expires or any(item.future.cancelled() for item in items):
            items = [
                item
                for item in items
                if not item.future.cancelled() and (item.deadline is None or now <= item.deadline)
            ]
            if not items:
                return items, {}, 0, 0.0
            inputs, padded = self._concatenate(items)
        computing = time.perf_counter()
        try:
            outputs = self._predict(inputs)
        except Exception:
            if len(items) == 1:
                raise
            return items, [self._alone(item) for item in items], padded, time.perf_counter() - computing
        return items, outputs, padded, time.perf_counter() - computing

    def _alone(self, item: _Item) -> _Alone:
        """One request of a failed batch computed by itself: its outputs, rows computed (padding
        included) and seconds of predict, or what the model raised."""
        if item.future.cancelled():
            return Unavailable("the request was withdrawn")  # nobody reads it
        if item.deadline is not None and time.monotonic() > item.deadline:
            return DeadlineExceeded("the request's deadline passed before it was computed")
        inputs, padded = self._concatenate([item])
        computing = time.perf_counter()
        try:
            outputs = self._predict(inputs)
        except Exception as error:
            return error
        return outputs, padded, time.perf_counter() - computing

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


def _check_rows(name: str, value: np.ndarray, padded: int) -> np.ndarray:
    """``value``, an output of a batch of ``padded`` rows.

    Raises:
        Internal: it does not have one row per row of the batch.
    """
    if value.ndim == 0 or len(value) != padded:
        raise Internal(f"output {name!r} has {value.shape[:1]} rows for a batch of {padded}")
    return value


def _same_ranks(a: dict[str, tuple[int, ...]], b: dict[str, tuple[int, ...]]) -> bool:
    """Whether padding can join inputs of shapes ``a`` and ``b``: each input has the same rank in
    both (runtimes that judge shapes themselves get them unchecked)."""
    return all(len(dims) == len(b[name]) for name, dims in a.items())


def _join_padded(parts: list[np.ndarray]) -> np.ndarray:
    """A split request's outputs joined along axis 0, each padded to the widest: its parts may
    have been padded to different neighbours' inputs."""
    widest = np.max([part.shape[1:] for part in parts], axis=0) if parts[0].ndim > 1 else ()
    return np.concatenate([_pad_to(part, (part.shape[0], *widest)) for part in parts])


def _pad_to(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` padded at the end of each axis to ``shape``: with zeros, or empty strings for
    strings (a framework refuses a string tensor holding numbers)."""
    if value.shape == tuple(shape):
        return value
    fill = "" if value.dtype.kind == "O" else 0
    widths = [(0, int(want) - have) for want, have in zip(shape, value.shape, strict=True)]
    return np.pad(value, widths, constant_values=fill)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
