"""Scoring ``inferd batch`` chunks: feature lookups per chunk, then batches in worker threads.

A chunk's features (the model's ``[features]``) are looked up on the event loop with one
``FeatureJoin`` call, so one store round trip for the chunk's entities that the cache lacks. Its
batches then run on the inference threads, each thread taking the next batch of the chunk in a
tight loop: the event loop is visited once per chunk and thread, not once per batch. Every batch
goes through the server's input checks (``conform_inputs``) before ``Model.predict``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import numpy as np

from inferd.errors import Internal, InvalidArgument
from inferd.features import FeatureJoin
from inferd.offline.sources import Chunk, Reject
from inferd.runtimes import Model
from inferd.service import conform_inputs
from inferd.types import Signature, Tensors

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_PROBE_SIZES = (64, 256, 1024, 4096, 16384)

_Scored = tuple[list[Tensors], dict[int, str]]
"""One batch's outputs (one part, or one per good row) and its refused rows' errors by offset."""


async def in_thread(pool: Executor | None, function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)`` on ``pool`` (the loop's default when None), awaited.

    A ``StopIteration`` it raises comes back as a ``RuntimeError``: asyncio cannot set a
    ``StopIteration`` on a future, drops it, and the awaiting task would wait forever.
    """

    def call() -> _T:
        try:
            return function(*args)
        except StopIteration as exc:
            raise RuntimeError(f"{getattr(function, '__name__', function)} raised StopIteration") from exc

    return await asyncio.get_running_loop().run_in_executor(pool, call)


class Scorer:
    """Scores chunks with ``model``'s ``signature`` on ``threads`` threads of ``pool``, joining
    features first when ``join`` is given; picks the batch size on the first chunk when none
    was given.

    A batch the input checks or the model refuse as INVALID_ARGUMENT is retried row by row, so
    that the rows at fault become rejects and the others are scored; so do rows whose entity is
    not in the feature store (and has no defaults).
    """

    def __init__(
        self,
        model: Model,
        signature: Signature,
        join: FeatureJoin | None,
        outputs: Sequence[str],
        batch_size: int,
        threads: int,
        pool: Executor,
    ) -> None:
        self._model = model
        self._signature = signature
        self._join = join
        self._outputs = tuple(outputs)
        self._threads = threads
        self._pool = pool
        self.batch_size = batch_size
        self._probing = asyncio.Lock()

    async def score(self, chunk: Chunk) -> tuple[Chunk, Tensors]:
        """The chunk (less the rows refused, moved to its rejects) and its outputs.

        Raises:
            Unavailable: the feature store failed (unless its settings fall back to defaults).
            Internal: the model did not return a chosen output, or one with a row per input row.
        """
        if self._join is not None and len(chunk.ids):
            joined, missing = await self._join.join_rows(self._signature.name, dict(chunk.inputs), None)
            chunk = dataclasses.replace(chunk, inputs=joined)
            if missing:
                chunk = without(chunk, missing)
        rows = len(chunk.ids)
        if not self.batch_size and rows:
            async with self._probing:  # the first chunk probes; one scored beside it waits
                if not self.batch_size:
                    self.batch_size = await in_thread(self._pool, self._probe, chunk.inputs, rows)
        size = self.batch_size or 1
        starts = range(0, rows, size)
        # Checked once for the chunk, when it passes; else batch by batch, to find the bad rows.
        conformed = await in_thread(self._pool, self._conformed, chunk.inputs)
        checked = conformed is not None
        inputs = chunk.inputs if conformed is None else conformed
        results: list[_Scored] = [([], {})] * len(starts)
        taken = itertools.count()

        def work() -> None:
            # next() on a count is atomic under the GIL, so each batch goes to one thread.
            while (i := next(taken)) < len(starts):
                start = starts[i]
                results[i] = self._batch({k: v[start : start + size] for k, v in inputs.items()}, checked)

        workers = min(self._threads, len(starts))
        await asyncio.gather(*(in_thread(self._pool, work) for _ in range(workers)))
        parts = [part for found, _ in results for part in found]
        failed = {
            i * size + offset: error
            for i, (_, errors) in enumerate(results)
            for offset, error in errors.items()
        }
        outputs = (
            {k: np.concatenate([p[k] for p in parts]) for k in self._outputs} if parts else self._empty()
        )
        return (without(chunk, failed) if failed else chunk), outputs

    def _empty(self) -> Tensors:
        """No rows of each chosen output, typed and shaped as the signature declares (free
        dimensions as 0), for a chunk whose every row was refused."""
        specs = {spec.name: spec for spec in self._signature.outputs}
        return {
            name: np.empty((0, *(max(d, 0) for d in (specs[name].shape or (-1,))[1:])), specs[name].dtype)
            for name in self._outputs
        }

    def _conformed(self, inputs: Tensors) -> Tensors | None:
        try:
            return conform_inputs(self._signature, inputs)
        except InvalidArgument:
            return None

    def _predict(self, inputs: Tensors, checked: bool = False) -> Tensors:
        """The chosen outputs for one batch, after the server's input checks unless ``checked``.

        Raises:
            Internal: the model did not return a chosen output, or one with a row per input row.
        """
        conformed = inputs if checked else conform_inputs(self._signature, inputs)
        found = self._model.predict(self._signature.name, conformed)
        missing = [name for name in self._outputs if name not in found]
        if missing:
            raise Internal(f"the model did not return output(s) {missing}")
        outputs = {name: np.asarray(found[name]) for name in self._outputs}
        rows = len(next(iter(conformed.values())))
        for name, value in outputs.items():
            if value.shape[:1] != (rows,):
                raise Internal(
                    f"the model's output {name!r} has {value.shape[:1]} rows for a batch of {rows}"
                )
        return outputs

    def _batch(self, batch: Tensors, checked: bool = False) -> _Scored:
        try:
            return [self._predict(batch, checked)], {}
        except InvalidArgument:
            parts, failed = [], {}
            for offset in range(len(next(iter(batch.values())))):
                try:
                    parts.append(self._predict({k: v[offset : offset + 1] for k, v in batch.items()}))
                except InvalidArgument as exc:
                    failed[offset] = exc.message
            return parts, failed

    def _probe(self, inputs: Tensors, rows: int) -> int:
        """The batch size with the best rows/s on this chunk's first rows (smallest within 5%)."""
        sizes = [s for s in _PROBE_SIZES if s <= rows] or [rows]
        rates = {}
        for size in sizes:
            batch = {k: v[:size] for k, v in inputs.items()}
            calls, started = 0, time.perf_counter()
            while calls < 3 or (time.perf_counter() - started < 0.1 and calls < 100):
                self._batch(batch)
                calls += 1
            rates[size] = size * calls / (time.perf_counter() - started)
        best = max(rates.values())
        size = min(s for s, rate in rates.items() if rate >= 0.95 * best)
        log.info("batch size %d (probe, rows/s by size: %s)", size, {s: round(r) for s, r in rates.items()})
        return size


def without(chunk: Chunk, failed: dict[int, str]) -> Chunk:
    """``chunk`` with the rows at offsets ``failed`` moved to its rejects, with their errors."""
    keep = np.ones(len(chunk.ids), dtype=bool)
    keep[list(failed)] = False
    rejects = [*chunk.rejects, *(Reject(int(chunk.numbers[i]), chunk.source, e) for i, e in failed.items())]
    return dataclasses.replace(
        chunk,
        numbers=chunk.numbers[keep],
        ids=chunk.ids[keep],
        inputs={k: v[keep] for k, v in chunk.inputs.items()},
        kept={k: v[keep] for k, v in chunk.kept.items()},
        rejects=sorted(rejects, key=lambda r: r.row),
    )
