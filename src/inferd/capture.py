"""Traffic capture: write a sample of answered requests, inputs and outputs, to Parquet files.

A model's ``[capture]`` table (``config.CaptureSettings``, re-read at each poll) names the folder,
the fraction, an allow-list of columns and a disk budget. ``TrafficCapture.offer`` is called when a
request has been answered: it draws the sample and puts references to the request's decoded inputs
and its outputs on a bounded queue, or drops the sample (counted in
``inferd_capture_samples_total{result="dropped"}``) when the writer falls behind; a request is
never delayed or refused for it. One writer thread turns samples into rows (one per row of the
request's batch) and writes a Parquet file of at most ``file_rows`` rows, at the latest
``flush_s`` after its first row: written under a dot-name and renamed, so the folder only ever
holds whole files, which ``inferd batch`` and ``inferd select --data`` read directly. After each
file the folder's oldest ``capture-*.parquet`` files are deleted while they exceed ``budget_mb``.

Columns: ``request_id`` (the server's, or the client's own for V2), ``time`` (UTC, when the answer
was sent), ``model``, ``version``, ``latency_ms`` (the request's time in the server), each input
by its name, each output as ``output.<name>``; a value of one element per row is a scalar, a larger
one a list of its elements (row-major).
"""

from __future__ import annotations

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
from inferd.servable import Servable
from inferd.service import Call
from inferd.types import Tensors

log = logging.getLogger(__name__)

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
        self.tables: list[Any] = []
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
        self._queue: queue.Queue[_Sample | None] = queue.Queue()
        self._thread: threading.Thread | None = None
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
        if self._queue.qsize() >= capture.queue:
            self._count(call.model, "dropped")
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="inferd-capture", daemon=True)
            self._thread.start()
        self._queue.put_nowait(
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

    def close(self) -> None:
        """Write every buffered row, then stop the writer (waits for it)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _count(self, model: str, result: str) -> None:
        key = (model, result)
        self._counts[key] = self._counts.get(key, 0) + 1

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
        folders: dict[Path, _Folder] = {}
        while True:
            waits = [
                f.first_s + f.settings.flush_s - time.monotonic()
                for f in folders.values()
                if f.rows and f.settings is not None
            ]
            try:
                sample = self._queue.get(timeout=max(0.0, min(waits)) if waits else None)
            except queue.Empty:
                sample = None
                stop = False
            else:
                stop = sample is None
            if sample is not None:
                folder = folders.setdefault(sample.settings.path, _Folder())
                try:
                    table = _table(sample)
                except Exception as exc:  # an odd tensor: the sample is lost, never a request
                    log.warning("cannot capture a request of model %s: %s", sample.model, exc)
                    self._count(sample.model, "failed")
                    continue
                if not folder.rows:
                    folder.first_s = time.monotonic()
                folder.tables.append(table)
                folder.rows += table.num_rows
                folder.settings = sample.settings
                self._count(sample.model, "written")
            now = time.monotonic()
            for path, folder in folders.items():
                settings = folder.settings
                due = stop or (settings is not None and now - folder.first_s >= settings.flush_s)
                if folder.rows and settings is not None and (due or folder.rows >= settings.file_rows):
                    self._flush(path, folder, settings)
            if stop:
                return

    def _flush(self, path: Path, folder: _Folder, settings: CaptureSettings) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables, folder.tables, folder.rows = folder.tables, [], 0
        try:
            path.mkdir(parents=True, exist_ok=True)
            table = pa.concat_tables(tables, promote_options="permissive")
            self._sequence += 1
            name = (
                f"capture-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}-{self._sequence:06d}"
            )
            staging = path / f".{name}.parquet.tmp"
            pq.write_table(table, staging)
            staging.rename(path / f"{name}.parquet")
            _keep_under(path, settings.budget_mb * 2**20)
        except Exception as exc:
            log.warning("cannot write a capture file to %s: %s", path, exc)


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


def _table(sample: _Sample) -> Any:
    """One sample -> an Arrow table with one row per row of the request's batch."""
    import pyarrow as pa

    tensors = {**sample.inputs, **{OUTPUT_PREFIX + k: v for k, v in sample.outputs.items()}}
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in tensors.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"its tensors do not share a batch dimension: {sorted(map(str, sizes))}")
    (rows,) = sizes
    assert rows is not None
    columns: dict[str, Any] = {
        "request_id": pa.array([sample.request_id] * rows, pa.string()),
        "time": pa.array([int(sample.time_s * 1e6)] * rows, pa.timestamp("us", tz="UTC")),
        "model": pa.array([sample.model] * rows, pa.string()),
        "version": pa.array([sample.version] * rows, pa.int64()),
        "latency_ms": pa.array([sample.latency_s * 1000] * rows, pa.float64()),
    }
    for name, value in tensors.items():
        array = np.asarray(value)
        flat = array.reshape(rows, -1)
        if array.dtype.kind == "O":
            flat = flat.astype(object)
        if flat.shape[1] == 1:
            columns[name] = pa.array(flat[:, 0])
        else:
            offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * flat.shape[1])
            columns[name] = pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1)))
    kept = sample.settings.fields
    if kept:
        columns = {k: v for k, v in columns.items() if k in kept}
    return pa.table(columns)
