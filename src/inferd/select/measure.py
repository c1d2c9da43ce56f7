"""Measuring one candidate, in a fresh process of its own.

Each candidate is loaded and timed in a new interpreter (``spawn``), one after another, so that
its memory figure holds only what it loaded and one candidate's threads, caches or imports never
slow another. The process loads the version through the same ``ModelManager`` and
``InferenceService`` as the server and ``inferd batch``, reads the validation set with
``inferd batch``'s sources, and reports:

- the model's outputs on every validation row (scored by ``inferd batch``'s ``Scorer``) and the
  labels lined up with them, for the parent to compute the optimizing metric;
- latency percentiles of single-row calls (``service.infer``, in-process, no network);
- rows/s at the batch size ``Scorer`` probes for (or ``--batch-size``), one inference thread,
  and the process's CPU-seconds per 1,000 rows over the same run;
- peak memory: the process's peak resident set minus its resident set before the model was
  loaded (the framework's import, the model, the validation data and the predictions).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import multiprocessing
import os
import resource
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from inferd.errors import InferdError, InvalidArgument, ModelLoadError
from inferd.local import in_process
from inferd.offline.scoring import Scorer
from inferd.offline.sources import TABULAR, Chunk, file_columns, find_inputs, plan_layout, read_chunks
from inferd.select.candidates import Candidate
from inferd.service import InferenceService
from inferd.types import DEFAULT_SIGNATURE, InferenceRequest, ModelRef, Tensors
from inferd.usage import read_pid

_CHUNK_ROWS = 65536
PROBABILITIES = "predict_proba"
"""The signature in which scikit-learn and booster models give class probabilities."""


@dataclass(frozen=True, slots=True)
class Job:
    """What one measuring process is asked to do."""

    candidate: Candidate
    data: str
    label: str
    """A column of the validation file, or, for ``.npy`` data, a ``.npy`` file of labels."""
    signature: str | None
    """The signature to call; None: ``serving_default``, or ``predict_proba`` where the model
    has one and ``scores`` is set."""
    scores: bool
    """The metric needs class scores (AUC)."""
    batch_size: int
    """Rows per call of the throughput run; 0 lets ``Scorer`` probe for the best."""
    latency_calls: int
    latency_budget_s: float
    throughput_budget_s: float
    log_level: int = logging.WARNING
    """The parent's logging level, for the measuring process's log lines."""
    drop_columns: tuple[str, ...] = ()
    """Columns of the validation set that are neither inputs nor the label (an id)."""


class DataMismatch(InvalidArgument):
    """The validation set does not fit a candidate's inputs: a mistake in the data or the flags,
    not in the candidate, so ``inferd select`` stops rather than failing every candidate."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """One candidate's raw figures; latencies in milliseconds."""

    outputs: dict[str, np.ndarray]
    labels: np.ndarray
    rejected: int
    latency_ms: dict[str, float]
    throughput_rps: float
    batch_size: int
    cpu_s_per_1000: float
    peak_memory_bytes: int


def measure(job: Job, timeout_s: float) -> Measurement:
    """Measure ``job`` in a fresh process.

    Raises:
        InferdError: the candidate failed to load, or the data does not fit it (its message);
            a crash or a timeout of the measuring process is a ``ModelLoadError``.
    """
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(child, job), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise ModelLoadError(f"measuring took longer than {timeout_s:.0f} s; stopped")
        kind, value = parent.recv()
    except EOFError:
        process.join(5)
        raise ModelLoadError(f"the measuring process died (exit code {process.exitcode})") from None
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        parent.close()
    if kind == "error":
        raise value
    assert isinstance(value, Measurement)
    return value


def _child(pipe: Connection, job: Job) -> None:
    logging.basicConfig(
        level=job.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        result: tuple[str, Any] = ("ok", asyncio.run(_measure(job)))
    except InferdError as exc:
        result = ("error", type(exc)(exc.message))
    except Exception as exc:  # anything the model's framework raised: report it, do not hang
        result = ("error", ModelLoadError(f"{type(exc).__name__}: {exc}"))
    pipe.send(result)
    pipe.close()


async def _measure(job: Job) -> Measurement:
    rss_before = read_pid(os.getpid())[1]
    async with in_process(job.candidate.plan, threads=1) as loaded:
        service, ref = loaded.service, loaded.ref
        signature = service.signature(ref, _signature_name(service, ref, job))

        async def infer(inputs: Tensors) -> Tensors:
            return dict((await service.infer(ref, InferenceRequest(inputs, signature.name))).outputs)

        try:
            chunk, labels = _validation(job, signature)
        except InvalidArgument as exc:
            raise DataMismatch(exc.message) from None
        outputs_wanted = [spec.name for spec in signature.outputs]
        scorer = Scorer(loaded.model, signature, None, outputs_wanted, job.batch_size, 1, loaded.pool)
        scored, outputs = await scorer.score(chunk)
        labels = labels[np.isin(chunk.numbers, scored.numbers)]
        latency = await _latency(infer, scored.inputs, job.latency_calls, job.latency_budget_s)
        rows_per_s, cpu_per_row = await _throughput(scorer, scored, job.throughput_budget_s)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Measurement(
        outputs=outputs,
        labels=labels,
        rejected=len(chunk.rejects) + len(chunk.ids) - len(scored.ids),
        latency_ms=latency,
        throughput_rps=rows_per_s,
        batch_size=scorer.batch_size,
        cpu_s_per_1000=cpu_per_row * 1000,
        peak_memory_bytes=max(0, peak - rss_before),
    )


def _signature_name(service: InferenceService, ref: ModelRef, job: Job) -> str:
    """The signature asked for, else the scores of scikit-learn and booster models for AUC."""
    if job.signature is not None:
        return job.signature
    if job.scores:
        try:
            return service.signature(ref, PROBABILITIES).name
        except InvalidArgument:
            pass  # no such signature: the default one may still give scores
    return DEFAULT_SIGNATURE


def _validation(job: Job, signature: Any) -> tuple[Chunk, np.ndarray]:
    """The validation set as one chunk, and the labels of its good rows, in order.

    For tabular files the label column is read as the rows' id column, which keeps it out of the
    model's inputs and lines it up with the rows that convert.
    """
    files, kind = find_inputs(job.data)
    tabular = kind in TABULAR.values()
    layout = plan_layout(signature, files, kind, job.label if tabular else None, (), job.drop_columns)
    if tabular and layout.id_column is not None and any(job.label in c for c in layout.columns.values()):
        raise InvalidArgument(f"--label {job.label!r} is also an input of the model")
    chunks = list(read_chunks(layout, signature, _CHUNK_ROWS))
    if not chunks:
        raise InvalidArgument(f"{job.data}: no rows")
    first = chunks[0]
    inputs = {k: np.concatenate([c.inputs[k] for c in chunks]) for k in first.inputs}
    numbers = np.concatenate([c.numbers for c in chunks])
    ids = np.concatenate([c.ids for c in chunks])
    rejects = [r for c in chunks for r in c.rejects]
    chunk = Chunk(0, sum(c.rows for c in chunks), first.source, numbers, ids, inputs, {}, rejects)
    if tabular:
        return chunk, ids
    return chunk, _label_file(job.label, sum(c.rows for c in chunks))[numbers]


def check_data(data: str, label: str, drop_columns: tuple[str, ...] = ()) -> None:
    """Fail early, before any candidate is measured, on a validation set that cannot be read or
    labelled: its columns are read from every file's header.

    Raises:
        InvalidArgument: no data files at ``data``; ``.npy`` data or images without a ``.npy``
            file of labels; a ``--label`` or ``--drop_columns`` column that some file lacks
            (named, with the columns it has and the nearest name).
    """
    files, kind = find_inputs(data)
    if kind not in TABULAR.values():
        if not label.endswith(".npy") or not Path(label).is_file():
            raise InvalidArgument(f"--label: with {kind} data, give the labels as a .npy file, got {label!r}")
        if drop_columns:
            raise InvalidArgument(f"--drop_columns needs tabular data, not {kind}")
        return
    if label in drop_columns:
        raise InvalidArgument(f"--drop_columns: {label!r} is the --label column")
    for path in files:
        columns = file_columns(path, kind)
        for flag, name in [("--label", label), *(("--drop_columns", c) for c in drop_columns)]:
            if name not in columns:
                near = difflib.get_close_matches(name, columns, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise InvalidArgument(
                    f"{flag} {name!r}: {path} has no such column; its columns are {_listed(columns)}{hint}"
                )


def _listed(columns: list[str]) -> str:
    return ", ".join(columns) if len(columns) <= 12 else ", ".join([*columns[:8], "...", *columns[-3:]])


def _label_file(path: str, rows: int) -> np.ndarray:
    labels = np.load(path, allow_pickle=False)
    if len(labels) != rows:
        raise InvalidArgument(f"--label {path}: {len(labels)} labels for {rows} rows of data")
    return np.asarray(labels)


async def _latency(infer: Any, inputs: Tensors, calls: int, budget_s: float) -> dict[str, float]:
    """Percentiles of single-row calls over the first rows, cycling, within ``budget_s``."""
    rows = len(next(iter(inputs.values())))
    if not rows:
        raise InvalidArgument("no validation row could be converted to the model's inputs")
    await infer({k: v[:1] for k, v in inputs.items()})  # the first call pays for lazy set-up
    times_ns: list[int] = []
    deadline = time.monotonic() + budget_s
    while len(times_ns) < calls and (len(times_ns) < 20 or time.monotonic() < deadline):
        row = len(times_ns) % rows
        started = time.perf_counter_ns()
        await infer({k: v[row : row + 1] for k, v in inputs.items()})
        times_ns.append(time.perf_counter_ns() - started)
    millis = np.asarray(times_ns) / 1e6
    return {f"p{q}": float(np.percentile(millis, q)) for q in (50, 90, 99)}


async def _throughput(scorer: Scorer, chunk: Chunk, budget_s: float) -> tuple[float, float]:
    """Rows/s of whole passes over the validation set, and process CPU-seconds per row."""
    rows = passes = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    while passes < 1 or time.perf_counter() - started < budget_s:
        await scorer.score(chunk)
        rows += len(chunk.ids)
        passes += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return rows / wall, cpu / rows
