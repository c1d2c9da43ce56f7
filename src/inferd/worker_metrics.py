"""``/metrics`` over every worker of ``--workers N``: each worker keeps recording in its own
process, as one process does (nothing is added to the request path), and answers its own
exposition on a Unix socket in the workers' private folder; the worker that a scrape reaches
reads its siblings' and merges them into one.

Merging: counters, histograms and summaries are summed per label set. Gauges are summed where
each worker holds its own share (requests in flight, queued rows, memory: ``SUMMED_GAUGES``),
the earliest is kept for ``process_start_time_seconds``, and the largest for the rest, which
every worker reports alike (budgets, rollout shares, batcher targets). A worker that does not
answer within ``SIBLING_TIMEOUT_S`` (dying, restarting) is left out of that scrape, and
``inferd_workers_scraped`` says how many answered. ``inferd_worker_requests`` counts the
requests each worker answered by protocol (all models), so that the spread over workers shows;
a restarted worker's count starts again from 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SIBLING_TIMEOUT_S = 2.0
"""How long a scrape waits for each sibling worker's exposition."""

SUMMED_GAUGES = frozenset(
    {
        "inferd_in_flight_requests",
        "inferd_queue_rows",
        "inferd_model_resident_bytes",
        "inferd_memory_used_bytes",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)
"""Gauges that are a per-process share of a whole: summed over workers."""

_EARLIEST_GAUGES = frozenset({"process_start_time_seconds"})


def socket_path(folder: Path, worker: int) -> Path:
    """Where worker number ``worker`` answers its own exposition."""
    return folder / f"metrics-{worker}.sock"


class WorkerMetrics:
    """One worker's side: ``serve`` answers this worker's exposition to its siblings;
    ``exposition`` is the merged text for ``/metrics``. Use from the event loop's thread."""

    def __init__(self, folder: Path, worker: int, own: Callable[[], bytes]) -> None:
        self._folder = folder
        self._worker = worker
        self._own = own
        self._server: asyncio.AbstractServer | None = None

    async def serve(self) -> None:
        """Start answering this worker's exposition on its socket (replacing a predecessor's)."""
        path = socket_path(self._folder, self._worker)
        path.unlink(missing_ok=True)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(self._own())
                await writer.drain()
            finally:
                writer.close()

        self._server = await asyncio.start_unix_server(answer, path=str(path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def exposition(self) -> bytes:
        """Every worker's metrics, merged (see the module's docstring)."""
        siblings = sorted(
            int(p.name.removeprefix("metrics-").removesuffix(".sock"))
            for p in self._folder.glob("metrics-*.sock")
            if p.name != socket_path(self._folder, self._worker).name
        )
        texts = await asyncio.gather(*(self._read(worker) for worker in siblings))
        parts = [(self._worker, self._own())]
        parts += [(worker, text) for worker, text in zip(siblings, texts, strict=True) if text is not None]
        return merge(parts)

    async def _read(self, worker: int) -> bytes | None:
        try:
            async with asyncio.timeout(SIBLING_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(str(socket_path(self._folder, worker)))
                try:
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.debug("worker %d's metrics left out of this scrape: %s", worker, exc)
            return None


def merge(parts: list[tuple[int, bytes]]) -> bytes:
    """The Prometheus text format of ``parts`` (worker number, its exposition) merged into one,
    plus ``inferd_worker_requests`` and ``inferd_workers_scraped``."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    answered: dict[tuple[str, str], float] = {}  # (worker, protocol) -> requests
    for worker, text in parts:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            combine = _combiner(family)
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = combine(samples[key], sample.value) if key in samples else sample.value
                if family.name == "inferd_requests" and sample.name.endswith("_total"):
                    by = (str(worker), sample.labels.get("protocol", ""))
                    answered[by] = answered.get(by, 0.0) + sample.value
    spread = Metric(
        "inferd_worker_requests", "Requests answered by each worker, by protocol (all models)", "counter"
    )
    for (worker, protocol), count in sorted(answered.items()):
        spread.add_sample("inferd_worker_requests_total", {"worker": worker, "protocol": protocol}, count)
    scraped = Metric("inferd_workers_scraped", "Workers whose metrics this scrape merged", "gauge")
    scraped.add_sample("inferd_workers_scraped", {}, float(len(parts)))
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), spread, scraped]))
    return generate_latest(registry)


def _combiner(family: Metric) -> Callable[[float, float], float]:
    if family.type != "gauge" or family.name in SUMMED_GAUGES:
        return _add
    return min if family.name in _EARLIEST_GAUGES else max


def _add(a: float, b: float) -> float:
    return a + b


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Any]:
        return iter(self._families)
