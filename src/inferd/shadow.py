"""Shadow traffic: mirror a sample of a model's answered requests to another version, off the
client's path, and compare the two answers.

A model's ``[shadow]`` table (``config.ShadowSettings``, re-read at each poll) names the version
and the fraction. ``ShadowMirror.offer`` is called when a request has been answered (its lease
returned, its answer encoded): it draws the sample and puts the request's decoded inputs and the
primary's outputs on the model's bounded queue, or drops them (counted) when it is full. The
model's worker task takes what is queued (up to ``MIRROR_BATCH``) and hands it, in one hop, to the
shadow thread (one for all models, at a lower OS priority, ``priority.py``; the models' hops take
turns on it) that checks the inputs, predicts on the shadow
version and compares; the event loop keeps only the lease and the counting. A shadow version
with ``[batching]`` (its rows are independent) gets the mirrored requests as one batch. So a slow
or failing shadow takes neither the inference threads, nor a batcher's queue, nor a client's
answer: it only drops more mirrored requests. Outputs are compared row by row (``compare``), and
the results exported per (model, primary version, shadow version):

- ``inferd_shadow_requests_total{result}``: ``compared``, ``failed`` (the shadow raised or was not
  available) or ``dropped`` (the queue was full);
- ``inferd_shadow_rows_total{agree}`` and ``inferd_shadow_agreement_ratio``;
- ``inferd_shadow_difference``: per row, the largest absolute difference of a numeric output;
- ``inferd_shadow_duration_seconds{side}``: the primary's request time and the shadow's predict
  time (of the whole batch, for a request predicted in one).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from inferd.config import ShadowSettings
from inferd.manager import ModelManager
from inferd.metrics import LATENCY_BUCKETS_S, Histogram, Metrics
from inferd.priority import lower_this_thread
from inferd.servable import Servable
from inferd.service import Call, conform_inputs
from inferd.types import ModelRef, Signature, Tensors

log = logging.getLogger(__name__)

DIFFERENCE_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
MIRROR_BATCH = 64
"""Mirrored requests the worker takes off the queue at most per hop to the shadow's thread."""


@dataclass(slots=True)
class _Mirrored:
    model: str
    primary: int
    settings: ShadowSettings
    signature: str
    inputs: Tensors
    outputs: Tensors
    primary_s: float


class PairStats:
    """What was mirrored from one primary version to one shadow version."""

    __slots__ = ("agreeing", "compared", "difference", "dropped", "failed", "primary_s", "rows", "shadow_s")

    def __init__(self) -> None:
        self.compared = self.failed = self.dropped = 0
        self.rows = self.agreeing = 0
        self.difference = Histogram(DIFFERENCE_BUCKETS)
        self.primary_s = Histogram(LATENCY_BUCKETS_S)
        self.shadow_s = Histogram(LATENCY_BUCKETS_S)


class ShadowMirror(Collector):
    """Mirrors answered calls to their model's ``[shadow]`` version; see the module docstring.

    Hook ``offer`` into ``InferenceService.answered``; ``close`` stops the worker and its thread.
    Event loop thread only (but ``collect``, which reads snapshots).
    """

    def __init__(self, manager: ModelManager[Servable], metrics: Metrics) -> None:
        self._manager = manager
        self._queues: dict[str, asyncio.Queue[_Mirrored]] = {}  # per model, each with its worker
        self._workers: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(1, "inferd-shadow", initializer=lower_this_thread)
        self._stats: dict[tuple[str, str, str], PairStats] = {}
        self._warned: set[tuple[str, str, str]] = set()
        metrics.registry.register(self)

    def offer(self, call: Call) -> None:
        """Mirror ``call`` when its model has a shadow and the sample draws it; never raises."""
        settings = self._manager.settings(call.model)
        shadow = settings.shadow if settings is not None else None
        primary = call.answered_by
        response = call.response
        if shadow is None or primary is None or response is None or primary == shadow.version:
            return
        if shadow.fraction < 1 and random.random() >= shadow.fraction:
            return
        queue = self._queues.get(call.model)
        if queue is None:
            queue = self._queues[call.model] = asyncio.Queue()
            self._workers.append(asyncio.get_running_loop().create_task(self._run(queue)))
        stats = self._pair(call.model, primary, shadow.version)
        if queue.qsize() >= shadow.queue:
            stats.dropped += 1
            return
        queue.put_nowait(
            _Mirrored(
                call.model,
                primary,
                shadow,
                call.signature_name,
                call.inputs,
                response.outputs,
                call.ended - call.started,
            )
        )

    def stats(self, model: str, primary: int, shadow: int) -> PairStats:
        """The counts of one version pair (zeros when nothing was mirrored yet)."""
        return self._stats.get((model, str(primary), str(shadow))) or PairStats()

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _pair(self, model: str, primary: int, shadow: int) -> PairStats:
        key = (model, str(primary), str(shadow))
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = PairStats()
        return stats

    async def _run(self, queue: asyncio.Queue[_Mirrored]) -> None:
        """One model's worker: its hops take turns on the shadow thread with other models'."""
        while True:
            items = [await queue.get()]
            while len(items) < MIRROR_BATCH and not queue.empty():
                items.append(queue.get_nowait())
            groups: dict[tuple[str, int, int, str], list[_Mirrored]] = {}
            for item in items:
                key = (item.model, item.primary, item.settings.version, item.signature)
                groups.setdefault(key, []).append(item)
            for group in groups.values():
                try:
                    await self._mirror(group)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the shadow's failure is only counted and logged
                    self._failed(group[0], len(group), exc)

    def _failed(self, item: _Mirrored, count: int, exc: Exception) -> None:
        stats = self._pair(item.model, item.primary, item.settings.version)
        stats.failed += count
        key = (item.model, str(item.primary), str(item.settings.version))
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "shadow version %d of model %s failed (later failures are only counted): %s",
                item.settings.version,
                item.model,
                exc,
            )

    async def _mirror(self, group: list[_Mirrored]) -> None:
        """Predict and compare ``group`` (one model, version pair and signature) on the shadow
        version, holding a lease on it; the work runs in one hop to the shadow's thread."""
        first = group[0]
        with self._manager.lease(ModelRef(first.model, version=first.settings.version)) as version:
            servable = version.servable
            assert servable is not None
            signature = servable.model.signatures[first.signature]
            joined: list[Tensors | Exception] | None = None
            if servable.join is not None:  # feature lookups are the event loop's
                joined = []
                for item in group:
                    try:
                        inputs = conform_inputs(servable.request_signature(signature), item.inputs)
                        joined.append(await servable.join.join(signature.name, inputs, None))
                    except Exception as exc:
                        joined.append(exc)
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, _predict_and_compare, servable, signature, group, joined
            )
        for item, result in zip(group, results, strict=True):
            if isinstance(result, Exception):
                self._failed(item, 1, result)
                continue
            agreeing, rows, differences, shadow_s = result
            stats = self._pair(item.model, item.primary, item.settings.version)
            stats.compared += 1
            stats.rows += rows
            stats.agreeing += agreeing
            for difference in differences:
                stats.difference.observe(difference)
            stats.primary_s.observe(item.primary_s)
            stats.shadow_s.observe(shadow_s)

    def collect(self) -> Iterator[Any]:
        labels = ["model", "primary", "shadow"]
        requests = CounterMetricFamily(
            "inferd_shadow_requests",
            "Requests mirrored to a shadow version, by result: compared, failed, dropped",
            labels=[*labels, "result"],
        )
        rows = CounterMetricFamily(
            "inferd_shadow_rows", "Rows compared, by whether both versions agreed", labels=[*labels, "agree"]
        )
        ratio = GaugeMetricFamily(
            "inferd_shadow_agreement_ratio", "Rows on which the shadow agreed with the primary", labels=labels
        )
        difference = HistogramMetricFamily(
            "inferd_shadow_difference", "Per row, the largest absolute output difference", labels=labels
        )
        duration = HistogramMetricFamily(
            "inferd_shadow_duration_seconds",
            "Primary request time and shadow predict time of mirrored requests",
            labels=[*labels, "side"],
        )
        for key, stats in list(self._stats.items()):
            for result in ("compared", "failed", "dropped"):
                requests.add_metric([*key, result], getattr(stats, result))
            rows.add_metric([*key, "true"], stats.agreeing)
            rows.add_metric([*key, "false"], stats.rows - stats.agreeing)
            if stats.rows:
                ratio.add_metric(list(key), stats.agreeing / stats.rows)
            difference.add_metric(list(key), stats.difference.buckets(), stats.difference.total)
            duration.add_metric([*key, "primary"], stats.primary_s.buckets(), stats.primary_s.total)
            duration.add_metric([*key, "shadow"], stats.shadow_s.buckets(), stats.shadow_s.total)
        yield from (requests, rows, ratio, difference, duration)


def compare(
    primary: Mapping[str, np.ndarray], shadow: Mapping[str, Any], how: str, tolerance: float
) -> tuple[int, int, list[float]]:
    """Compare two answers row by row (axis 0) over the primary's outputs.

    A row agrees when it agrees on every output: by argmax over the last axis (``argmax``; ``auto``
    for float outputs of two or more columns), within ``tolerance`` (``tolerance``; ``auto`` for
    other float outputs), or exactly (``exact``; ``auto`` for the rest). A missing output or a
    shape that differs disagrees on every row.

    Returns:
        Rows that agree, rows compared, and per row the largest absolute difference of a numeric
        output (none for rows with no numeric output, or where only one side is NaN). NaN on both
        sides agrees.
    """
    rows = max((np.asarray(v).shape[0] if np.ndim(v) else 1 for v in primary.values()), default=0)
    if rows == 0:  # an empty batch: nothing to compare (reshape(0, -1) would raise)
        return 0, 0, []
    agree = np.ones(rows, dtype=bool)
    difference: np.ndarray | None = None
    for name, value in primary.items():
        p = np.asarray(value)
        s = np.asarray(shadow[name]) if name in shadow else None
        if s is None or s.shape != p.shape or p.ndim == 0 or p.shape[0] != rows:
            agree[:] = False
            continue
        p2, s2 = p.reshape(rows, -1), s.reshape(rows, -1)
        numeric = p.dtype.kind in "biuf" and s.dtype.kind in "biuf"
        if numeric:
            pf, sf = p2.astype(np.float64), s2.astype(np.float64)
            equal = (p2 == s2) | (np.isnan(pf) & np.isnan(sf))  # NaN on both sides: the same answer
            with np.errstate(invalid="ignore"):  # inf - inf, left out by ``equal``
                gap = np.abs(np.where(equal, 0.0, pf - sf)).max(axis=1, initial=0.0)  # NaN: one side NaN
            difference = gap if difference is None else np.maximum(difference, gap)
        mode = how
        if mode == "auto":
            mode = (
                "exact"
                if p.dtype.kind != "f"
                else "argmax"
                if p.ndim >= 2 and p.shape[-1] > 1
                else "tolerance"
            )
        if mode == "argmax" and numeric and p.ndim >= 2:
            same = (np.argmax(p, axis=-1) == np.argmax(s, axis=-1)).reshape(rows, -1).all(axis=1)
        elif mode == "tolerance" and numeric:
            assert difference is not None
            same = gap <= tolerance
        else:
            same = (equal if numeric else p2 == s2).all(axis=1)
        agree &= same
    # A row where one side is NaN disagrees and has no difference to show (nor to add to a sum).
    return (
        int(agree.sum()),
        rows,
        [] if difference is None else [float(d) for d in difference[~np.isnan(difference)]],
    )


_Result = tuple[int, int, list[float], float] | Exception


def _predict_and_compare(
    servable: Servable, signature: Signature, group: list[_Mirrored], joined: list[Tensors | Exception] | None
) -> list[_Result]:
    """On the shadow's thread: each item's (agreeing rows, rows, differences, shadow seconds) or
    its exception. The items go to the model in one call when the shadow version batches
    (``[batching]`` says its rows are independent) without ``allowed_batch_sizes``, each input has
    the same shape past the first axis in every item, and the rows fit its ``max_batch_size``;
    otherwise one call each."""
    inputs: list[Tensors | Exception] = []
    for i, item in enumerate(group):
        if joined is not None:
            inputs.append(joined[i])
            continue
        try:
            inputs.append(conform_inputs(servable.request_signature(signature), item.inputs))
        except Exception as exc:
            inputs.append(exc)
    merged = _merge(servable, [x for x in inputs if not isinstance(x, Exception)])
    if merged is not None and len(merged[1]) == len(group):
        started = time.perf_counter()
        try:
            outputs = servable.model.predict(signature.name, merged[0])
        except Exception as exc:
            return [exc] * len(group)
        shadow_s = time.perf_counter() - started
        total = sum(merged[1])
        if all(np.ndim(v) and len(v) == total for v in outputs.values()):
            results: list[_Result] = []
            offset = 0
            for item, rows in zip(group, merged[1], strict=True):
                part = {name: value[offset : offset + rows] for name, value in outputs.items()}
                offset += rows
                how, tolerance = item.settings.compare, item.settings.tolerance
                results.append((*compare(item.outputs, part, how, tolerance), shadow_s))
            return results
    results = []
    for item, conformed in zip(group, inputs, strict=True):
        if isinstance(conformed, Exception):
            results.append(conformed)
            continue
        started = time.perf_counter()
        try:
            outputs = servable.model.predict(signature.name, conformed)
        except Exception as exc:
            results.append(exc)
            continue
        shadow_s = time.perf_counter() - started
        results.append(
            (*compare(item.outputs, outputs, item.settings.compare, item.settings.tolerance), shadow_s)
        )
    return results


def _merge(servable: Servable, inputs: list[Tensors]) -> tuple[Tensors, list[int]] | None:
    """``inputs`` concatenated on the first axis and each one's rows, when they can go to the model
    as one batch (see ``_predict_and_compare``); None otherwise."""
    batching = servable.batching
    if len(inputs) < 2 or batching is None or batching.allowed_batch_sizes:  # fixed sizes: one each
        return None
    first = inputs[0]
    rows: list[int] = []
    for tensors in inputs:
        counts = {v.shape[0] if v.ndim else -1 for v in tensors.values()}
        if len(counts) != 1 or -1 in counts or tensors.keys() != first.keys():
            return None
        if any(v.shape[1:] != first[n].shape[1:] or v.dtype != first[n].dtype for n, v in tensors.items()):
            return None
        rows.append(counts.pop())
    if sum(rows) > batching.max_batch_size:
        return None
    return {name: np.concatenate([t[name] for t in inputs]) for name in first}, rows
