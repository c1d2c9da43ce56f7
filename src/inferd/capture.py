"""Traffic capture: write a sample of answered requests, inputs and outputs, to Parquet files.

A model's ``[capture]`` table (``config.CaptureSettings``, re-read at each poll) names the folder,
the fraction, an allow-list of columns and a disk budget. ``TrafficCapture.offer`` is called when a
request has been answered: it draws the sample and keeps references to the request's decoded inputs
and its outputs for the writer, or drops the sample (counted in
``inferd_capture_samples_total{result="dropped"}``) when the writer falls behind; a request is never
delayed or refused for it. The samples are handed to the writer every ``HANDOFF_S``, one wake-up for
all of them: handing each one over (a wake-up of the writer thread per sample) cost 13-20% of the
throughput at a 1% sample in ``bench.rollouts``. One writer thread turns samples into
rows (one per row of the request's batch) and writes a Parquet file of at most ``file_rows`` rows,
at the latest ``flush_s`` after its first row: written under a dot-name and renamed, so the folder
only ever holds whole files, which ``inferd batch`` and ``inferd select --data`` read directly.
After each file the folder's oldest ``capture-*.parquet`` files are deleted while they exceed
``budget_mb``.

Columns: ``request_id`` (the server's, or the client's own for V2), ``time`` (UTC, when the answer
was sent), ``model``, ``version``, ``latency_ms`` (the request's time in the server), each input
by its name, each output as ``output.<name>``; a value of one element per row is a scalar, a larger
one a list of its elements (row-major).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from inferd.config import CaptureSettings
from inferd.manager import ModelManager
from inferd.metrics import Metrics
from inferd.priority import lower_this_thread
from inferd.servable import Servable
from inferd.service import Call
from inferd.types import Tensors

log = logging.getLogger(__name__)

HANDOFF_S = 0.5
"""How often the event loop hands the samples drawn since the last time to the writer thread."""

OUTPUT_PREFIX = "output."
"""Output ``y`` is captured as column ``output.y``."""


@dataclass(slots=True)
class _Sample:
    settings: CaptureSettings
    model: str
    version: int
    request_id: str
    time_s: float
    latency_s: float
    inputs: Tensors
    outputs: Tensors


class _Folder:
    """Rows waiting for one capture folder."""

    def __init__(self) -> None:
        self.samples: list[_Rows] = []
        self.models: dict[str, int] = {}  # samples waiting, by model: counted when their file is
        self.rows = 0
        self.first_s = 0.0
        self.settings: CaptureSettings | None = None


class TrafficCapture(Collector):
    """Captures answered calls of models with ``[capture]``; see the module docstring.

    Hook ``offer`` into ``InferenceService.answered`` (event loop thread); ``close`` writes what
    is buffered and stops the writer thread.
    """

    def __init__(self, manager: ModelManager[Servable], metrics: Metrics) -> None:
        self._manager = manager
        self._queue: queue.Queue[list[_Sample] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._batch: list[_Sample] = []  # drawn samples not yet handed to the writer
        # Per model, samples drawn (written by the event loop only) and taken in by the writer
        # (by the writer only): their difference waits, each count free of the other thread's.
        self._drawn: dict[str, int] = {}
        self._taken: dict[str, int] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._sequence = 0
        metrics.registry.register(self)

    def offer(self, call: Call) -> None:
        """Capture ``call`` when its model captures and the sample draws it; never raises."""
        settings = self._manager.settings(call.model)
        capture = settings.capture if settings is not None else None
        response = call.response
        if capture is None or response is None:
            return
        if capture.fraction < 1 and random.random() >= capture.fraction:
            return
        drawn = self._drawn.get(call.model, 0)
        if drawn - self._taken.get(call.model, 0) >= capture.queue:
            self._count(call.model, "dropped")
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="inferd-capture", daemon=True)
            self._thread.start()
        if not self._batch:
            asyncio.get_running_loop().call_later(HANDOFF_S, self._hand_off)
        self._drawn[call.model] = drawn + 1
        self._batch.append(
            _Sample(
                capture,
                call.model,
                response.model_id.version,
                response.id or call.id,
                time.time(),
                call.ended - call.started,
                call.inputs,
                response.outputs,
            )
        )

    def _hand_off(self) -> None:
        """Give the writer the samples drawn since the last hand-off, in one wake-up."""
        batch, self._batch = self._batch, []
        if batch:
            self._queue.put_nowait(batch)

    def close(self) -> None:
        """Write every buffered row, then stop the writer (waits for it)."""
        self._hand_off()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _count(self, model: str, result: str, samples: int = 1) -> None:
        key = (model, result)
        self._counts[key] = self._counts.get(key, 0) + samples

    def collect(self) -> Iterator[Any]:
        samples = CounterMetricFamily(
            "inferd_capture_samples",
            "Sampled requests by result: written, dropped (the writer fell behind), failed",
            labels=["model", "result"],
        )
        for key, count in list(self._counts.items()):
            samples.add_metric(list(key), count)
        yield samples

    def _write_loop(self) -> None:
        lower_this_thread()
        folders: dict[Path, _Folder] = {}
        while True:
            waits = [
                f.first_s + f.settings.flush_s - time.monotonic()
                for f in folders.values()
                if f.rows and f.settings is not None
            ]
            try:
                batch = self._queue.get(timeout=max(0.0, min(waits)) if waits else None)
            except queue.Empty:
                batch = []
                stop = False
            else:
                stop = batch is None
            for sample in batch or ():
                self._taken[sample.model] = self._taken.get(sample.model, 0) + 1
                folder = folders.setdefault(sample.settings.path, _Folder())
                try:
                    rows = _rows(sample)
                except Exception as exc:  # an odd tensor: the sample is lost, never a request
                    log.warning("cannot capture a request of model %s: %s", sample.model, exc)
                    self._count(sample.model, "failed")
                    continue
                if not folder.rows:
                    folder.first_s = time.monotonic()
                folder.samples.append(rows)
                folder.rows += (
                    len(rows["version"]) if "version" in rows else len(next(iter(rows.values()), ()))
                )
                folder.settings = sample.settings
                folder.models[sample.model] = folder.models.get(sample.model, 0) + 1
            now = time.monotonic()
            for path, folder in folders.items():
                settings = folder.settings
                due = stop or (settings is not None and now - folder.first_s >= settings.flush_s)
                if folder.rows and settings is not None and (due or folder.rows >= settings.file_rows):
                    self._flush(path, folder, settings)
            if stop:
                return

    def _flush(self, path: Path, folder: _Folder, settings: CaptureSettings) -> None:
        import pyarrow.parquet as pq

        samples, folder.samples, folder.rows = folder.samples, [], 0
        models, folder.models = folder.models, {}
        result = "failed"
        try:
            path.mkdir(parents=True, exist_ok=True)
            table = _table(samples)
            self._sequence += 1
            name = (
                f"capture-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}-{self._sequence:06d}"
            )
            staging = path / f".{name}.parquet.tmp"
            pq.write_table(table, staging)
            staging.rename(path / f"{name}.parquet")
            result = "written"
            _keep_under(path, settings.budget_mb * 2**20)
        except Exception as exc:
            log.warning("cannot write a capture file to %s: %s", path, exc)
        for model, count in models.items():
            self._count(model, result, count)


def _keep_under(path: Path, budget_bytes: float) -> None:
    """Delete the oldest capture files of ``path`` while they take more than ``budget_bytes``."""
    files = sorted(path.glob("capture-*.parquet"))
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    for file, size in zip(files, sizes, strict=True):
        if total <= budget_bytes:
            break
        file.unlink(missing_ok=True)
        total -= size


_Rows = dict[str, np.ndarray]
"""One sample's columns: each an array with one entry (1-D) or one flat row (2-D) per row."""


def _rows(sample: _Sample) -> _Rows:
    """One sample -> its columns as numpy arrays, one row per row of the request's batch; cheap
    (views and small arrays): the Arrow conversion is done once per file, in ``_table``."""
    tensors = {**sample.inputs, **{OUTPUT_PREFIX + k: v for k, v in sample.outputs.items()}}
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in tensors.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"its tensors do not share a batch dimension: {sorted(map(str, sizes))}")
    (rows,) = sizes
    assert rows is not None
    columns: _Rows = {
        "request_id": np.full(rows, sample.request_id, dtype=object),
        "time": np.full(rows, int(sample.time_s * 1e6), dtype=np.int64),
        "model": np.full(rows, sample.model, dtype=object),
        "version": np.full(rows, sample.version, dtype=np.int64),
        "latency_ms": np.full(rows, sample.latency_s * 1000, dtype=np.float64),
    }
    for name, value in tensors.items():
        flat = np.asarray(value).reshape(rows, -1)
        columns[name] = flat[:, 0] if flat.shape[1] == 1 else flat
    kept = sample.settings.fields
    if not kept:
        return columns
    chosen = {k: v for k, v in columns.items() if k in kept}
    if not chosen:  # no rows: it would wait in memory for ever, counted as written
        raise ValueError(f"'fields' {list(kept)} names none of its columns {list(columns)}")
    return chosen


def _table(samples: list[_Rows]) -> Any:
    """Samples -> one Arrow table: samples of the same column layout are concatenated as numpy
    first and converted once; a tensor of one value per row is a scalar column, a larger one a
    list column."""
    import pyarrow as pa

    groups: dict[tuple[tuple[str, str, int], ...], list[_Rows]] = {}
    for columns in samples:
        key = tuple((k, v.dtype.str, v.shape[1] if v.ndim == 2 else 0) for k, v in columns.items())
        groups.setdefault(key, []).append(columns)
    tables = []
    for group in groups.values():
        arrays: dict[str, Any] = {}
        for name in group[0]:
            joined = np.concatenate([columns[name] for columns in group])
            if name == "time":
                arrays[name] = pa.array(joined, pa.timestamp("us", tz="UTC"))
            elif joined.ndim == 2:
                offsets = pa.array(np.arange(len(joined) + 1, dtype=np.int32) * joined.shape[1])
                arrays[name] = pa.ListArray.from_arrays(offsets, pa.array(joined.reshape(-1)))
            else:
                arrays[name] = pa.array(joined)
        tables.append(pa.table(arrays))
    return pa.concat_tables(tables, promote_options="permissive")
