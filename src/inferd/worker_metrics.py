"""``/metrics`` over every worker of ``--workers N``: each worker keeps recording in its own
process, as one process does (nothing is added to the request path), and answers its own
exposition on a Unix socket in the workers' private folder; the worker that a scrape reaches
reads its siblings' and merges them into one.

Merging: counters, histograms and summaries are summed per label set. Gauges are summed where
each worker holds its own share (requests in flight, queued rows, memory: ``SUMMED_GAUGES``),
the earliest is kept for ``process_start_time_seconds``, and the largest for the rest, which
every worker reports alike (budgets, rollout shares, batcher targets).

Counters never go back, so that ``rate()`` sees no false reset: each scrape keeps, in the private
folder, the last exposition it merged of every worker (``.seen``). A worker that does not answer
within ``SIBLING_TIMEOUT_S`` (dying, restarting, stuck, or stopped with its socket) is merged
from that copy, its counters, histograms and summaries only; and a worker that starts in a
killed one's place adds the copy to the counts of the workers it replaced (``.retired``), which
every scrape merges too. What a killed worker counted after the last scrape is lost.
``inferd_workers_scraped`` says how many workers answered. ``inferd_worker_requests`` counts the
requests each worker answered by protocol (all models, its predecessors' included), so that the
spread over workers shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

from inferd.metrics import LATENCY_BUCKETS_S

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


_CUMULATIVE = frozenset({"counter", "histogram", "summary"})


def socket_path(folder: Path, worker: int) -> Path:
    """Where worker number ``worker`` answers its own exposition."""
    return folder / f"metrics-{worker}.sock"


def seen_path(folder: Path, worker: int) -> Path:
    """The last exposition of worker number ``worker`` that a scrape merged."""
    return folder / f"metrics-{worker}.seen"


def retired_path(folder: Path, worker: int) -> Path:
    """The cumulative metrics of the killed workers that worker number ``worker`` replaced."""
    return folder / f"metrics-{worker}.retired"


class WorkerMetrics:
    """One worker's side: ``serve`` answers this worker's exposition to its siblings;
    ``exposition`` is the merged text for ``/metrics``. Use from the event loop's thread."""

    def __init__(self, folder: Path, worker: int, own: Callable[[], bytes]) -> None:
        self._folder = folder
        self._worker = worker
        self._own = own
        self._server: asyncio.AbstractServer | None = None

    async def serve(self) -> None:
        """Start answering this worker's exposition on its socket (replacing a predecessor's,
        whose last merged counts are retired first)."""
        self._retire()
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

    def _retire(self) -> None:
        """Add the last merged exposition of the worker this one replaces (if any) to the
        counts retired in its place."""
        seen, retired = seen_path(self._folder, self._worker), retired_path(self._folder, self._worker)
        try:
            last = seen.read_bytes()
        except FileNotFoundError:
            return
        earlier = retired.read_bytes() if retired.exists() else b""
        _write(retired, cumulative(merge([("retired", earlier), ("last", cumulative(last))])))
        seen.unlink()

    async def exposition(self) -> bytes:
        """Every worker's metrics, merged (see the module's docstring)."""
        # Also a sibling whose socket went with it (Python 3.13's asyncio removes a Unix server's
        # socket file when it closes) but whose counts a scrape merged before.
        found = [*self._folder.glob("metrics-*.sock"), *self._folder.glob("metrics-*.seen")]
        siblings = sorted({int(p.stem.removeprefix("metrics-")) for p in found} - {self._worker})
        texts = await asyncio.gather(*(self._read(worker) for worker in siblings))
        live: list[tuple[int, bytes]] = [(self._worker, self._own())]
        live += [(worker, text) for worker, text in zip(siblings, texts, strict=True) if text is not None]
        parts: list[tuple[int | str, bytes]] = list(live)
        for worker, text in live:
            _write(seen_path(self._folder, worker), text)
        for worker, answer in zip(siblings, texts, strict=True):
            if answer is None and (last := _read_file(seen_path(self._folder, worker))) is not None:
                parts.append((worker, cumulative(last)))
        for path in self._folder.glob("metrics-*.retired"):
            if (retired := _read_file(path)) is not None:
                parts.append((int(path.name.removeprefix("metrics-").removesuffix(".retired")), retired))
        return merge(parts, scraped=len(live))

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


def cumulative(text: bytes) -> bytes:
    """The counter, histogram and summary families of an exposition (``inferd_worker_requests``
    left out: ``merge`` counts it anew)."""
    out: list[str] = []
    kept, help_line = False, ""
    for line in text.decode().split("\n"):
        words = line.split(" ", 3) if line.startswith("#") else []
        if len(words) >= 3 and words[1] == "HELP":  # before its family's TYPE
            kept, help_line = False, line
        elif len(words) >= 3 and words[1] == "TYPE":
            kept = len(words) > 3 and words[3] in _CUMULATIVE
            kept = kept and not words[2].startswith("inferd_worker_requests")
            if kept:
                out += [help_line, line] if help_line else [line]
            help_line = ""
        elif kept and line:
            out.append(line)
    return ("\n".join(out) + "\n").encode() if out else b""


def merge(parts: list[tuple[int | str, bytes]], scraped: int | None = None) -> bytes:
    """The Prometheus text format of ``parts`` (the worker's number, or a Ray replica's id, and its
    exposition) merged into one, plus ``inferd_worker_requests`` and ``inferd_workers_scraped``
    (``scraped``, else the number of parts).

    Works on lines, not parsed samples: every worker writes a label set the same way (the same
    code formats it), so a sample's text before its value is its key. Families and samples keep
    the order of their first appearance.
    """
    headers: dict[str, dict[str, str]] = {}  # family -> its HELP and TYPE lines, by kind
    samples: dict[str, dict[str, float]] = {}  # family -> sample key (name and labels) -> value
    combine: dict[str, Callable[[float, float], float]] = {}
    answered: dict[tuple[str, str], float] = {}  # (worker, protocol) -> requests
    for worker, text in parts:
        family = ""
        for line in text.decode().split("\n"):  # not splitlines(): a label value may hold \r
            if line.startswith("#"):
                words = line.split(" ", 3)
                if len(words) >= 3 and words[1] in ("HELP", "TYPE"):
                    family = words[2]
                    if family not in samples:
                        headers[family], samples[family] = {}, {}
                    headers[family].setdefault(words[1], line)
                    if words[1] == "TYPE":
                        combine[family] = _combiner(family, words[3] if len(words) > 3 else "")
                continue
            key, _, text_value = line.rpartition(" ")
            if not key:
                continue
            value = float(text_value)
            table = samples.setdefault(family, {})
            table[key] = combine.get(family, _add)(table[key], value) if key in table else value
            if key.startswith("inferd_requests_total{"):
                by = (str(worker), _label(key, "protocol"))
                answered[by] = answered.get(by, 0.0) + value
    out: list[str] = []
    for family, table in samples.items():
        kinds = headers.get(family, {})
        out += [kinds[kind] for kind in ("HELP", "TYPE") if kind in kinds]
        out += [f"{key} {_number(value)}" for key, value in table.items()]
    out += [
        "# HELP inferd_worker_requests_total Requests answered by each worker, by protocol (all models)",
        "# TYPE inferd_worker_requests_total counter",
    ]
    out += [
        f'inferd_worker_requests_total{{protocol="{protocol}",worker="{worker}"}} {_number(count)}'
        for (worker, protocol), count in sorted(answered.items())
    ]
    out += [
        "# HELP inferd_workers_scraped Workers whose metrics this scrape merged",
        "# TYPE inferd_workers_scraped gauge",
        f"inferd_workers_scraped {_number(float(len(parts) if scraped is None else scraped))}",
    ]
    return ("\n".join(out) + "\n").encode()


def requests_in(text: bytes, model: str, version: str) -> tuple[int, int, list[int]]:
    """What ``Metrics.requests_of`` counts of one version, read from an exposition (``merge``'s,
    over every worker): requests, failed ones (status not OK), and the bucket counts of their
    total time (``LATENCY_BUCKETS_S``, then past the last bound)."""
    total = failed = 0
    index = {repr(float(bound)): i for i, bound in enumerate(LATENCY_BUCKETS_S)}
    index["+Inf"] = len(LATENCY_BUCKETS_S)
    upto = [0.0] * (len(LATENCY_BUCKETS_S) + 1)  # cumulative counts, summed over protocols
    for line in text.decode().split("\n"):
        if not line.startswith(("inferd_requests_total{", "inferd_request_duration_seconds_bucket{")):
            continue
        key, _, value = line.rpartition(" ")
        if _label(key, "model") != model or _label(key, "version") != version:
            continue
        if key.startswith("inferd_requests_total{"):
            total += int(float(value))
            failed += int(float(value)) if _label(key, "status") != "OK" else 0
        elif _label(key, "stage") == "total" and (at := index.get(_label(key, "le"))) is not None:
            upto[at] += float(value)
    buckets = [int(b - a) for a, b in zip([0.0, *upto], upto, strict=False)]
    return total, failed, buckets


def shadow_rows_in(text: bytes, model: str, primary: int, shadow: int) -> tuple[int, int]:
    """The rows on which shadow ``shadow`` agreed with ``primary``, and all rows compared, read
    from an exposition (``inferd_shadow_rows_total``)."""
    agreeing = rows = 0
    for line in text.decode().split("\n"):
        if not line.startswith("inferd_shadow_rows_total{"):
            continue
        key, _, value = line.rpartition(" ")
        labels = (_label(key, "model"), _label(key, "primary"), _label(key, "shadow"))
        if labels == (model, str(primary), str(shadow)):
            rows += int(float(value))
            agreeing += int(float(value)) if _label(key, "agree") == "true" else 0
    return agreeing, rows


def _write(path: Path, text: bytes) -> None:
    """Replace ``path`` with ``text`` at once (a reader never sees half of it); an error is logged."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # workers may write one at once
    try:
        staging.write_bytes(text)
        staging.replace(path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label(key: str, name: str) -> str:
    """The value of label ``name`` in a sample key ``metric{a="x",b="y"}`` ('' when absent)."""
    marker = f'{name}="'
    at = key.find(marker)
    if at < 0:
        return ""
    start = at + len(marker)
    return key[start : key.find('"', start)]


def _combiner(family: str, kind: str) -> Callable[[float, float], float]:
    if kind != "gauge" or family in SUMMED_GAUGES:
        return _add
    return min if family in _EARLIEST_GAUGES else max


def _add(a: float, b: float) -> float:
    return a + b
