"""Shadow traffic: mirror a sample of a model's answered requests to another version, off the
client's path, and compare the two answers.

A model's ``[shadow]`` table (``config.ShadowSettings``, re-read at each poll) names the version
and the fraction. ``ShadowMirror.offer`` is called when a request has been answered (its lease
returned, its answer encoded): it draws the sample and puts the request's decoded inputs and the
primary's outputs on a bounded queue, or drops them (counted) when the queue is full. One worker
task takes them one at a time and predicts on the shadow version in a thread of its own, so a slow
or failing shadow takes neither the inference threads, nor a batcher's queue, nor a client's
answer: it only drops more mirrored requests. Outputs are compared row by row (``compare``), and
the results exported per (model, primary version, shadow version):

- ``inferd_shadow_requests_total{result}``: ``compared``, ``failed`` (the shadow raised or was not
  available) or ``dropped`` (the queue was full);
- ``inferd_shadow_rows_total{agree}`` and ``inferd_shadow_agreement_ratio``;
- ``inferd_shadow_difference``: per row, the largest absolute difference of a numeric output;
- ``inferd_shadow_duration_seconds{side}``: the primary's request time and the shadow's predict
  time.
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
from inferd.servable import Servable
from inferd.service import Call, conform_inputs
from inferd.types import ModelRef, Tensors

log = logging.getLogger(__name__)

DIFFERENCE_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


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
        self._queue: asyncio.Queue[_Mirrored] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inferd-shadow")
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
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        stats = self._pair(call.model, primary, shadow.version)
        if self._queue.qsize() >= shadow.queue:
            stats.dropped += 1
            return
        self._queue.put_nowait(
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
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _pair(self, model: str, primary: int, shadow: int) -> PairStats:
        key = (model, str(primary), str(shadow))
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = PairStats()
        return stats

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            try:
                await self._mirror(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the shadow's failure is only counted and logged
                stats = self._pair(item.model, item.primary, item.settings.version)
                stats.failed += 1
                key = (item.model, str(item.primary), str(item.settings.version))
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning(
                        "shadow version %d of model %s failed (later failures are only counted): %s",
                        item.settings.version,
                        item.model,
                        exc,
                    )

    async def _mirror(self, item: _Mirrored) -> None:
        shadow = item.settings
        with self._manager.lease(ModelRef(item.model, version=shadow.version)) as version:
            servable = version.servable
            assert servable is not None
            signature = servable.model.signatures[item.signature]
            inputs = conform_inputs(servable.request_signature(signature), item.inputs)
            if servable.join is not None:
                inputs = await servable.join.join(signature.name, inputs, None)
            started = time.perf_counter()
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, servable.model.predict, signature.name, inputs
            )
            shadow_s = time.perf_counter() - started
        agreeing, rows, differences = compare(item.outputs, outputs, shadow.compare, shadow.tolerance)
        stats = self._pair(item.model, item.primary, shadow.version)
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
        output (none for rows with no numeric output).
    """
    rows = max((np.asarray(v).shape[0] if np.ndim(v) else 1 for v in primary.values()), default=0)
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
            gap = np.abs(p2.astype(np.float64) - s2.astype(np.float64)).max(axis=1, initial=0.0)
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
            same = (p2 == s2).all(axis=1)
        agree &= same
    return int(agree.sum()), rows, [] if difference is None else [float(d) for d in difference]
