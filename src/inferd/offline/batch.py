"""``inferd batch``: score files offline, in-process, in large batches, with bounded memory.

The model is loaded through the same ``ModelManager`` as the server (runtimes, ``inferd.toml``,
warm-up) and called with the server's input checks and feature join, without its batcher. Three
stages overlap, joined by bounded queues: a reader thread turns input into chunks
(``sources``), the scorer joins each chunk's features and runs its batches on the inference
threads (``scoring``), and a writer thread writes one part file per chunk (``sinks``). At most
``_IN_FLIGHT_CHUNKS`` chunks exist at once, and the chunk size follows from
``--memory-budget-mb``.

Another engine (``inferd batch --engine ray``) replaces the reading and scoring stages: it is an
``Engine``, given the ``Job`` (the same layout, chunking, outputs and finished chunks) and
yielding ``Scored`` chunks, which this module writes, merges and summarises as it does its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import resource
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import orjson

from inferd.config import FeatureSettings
from inferd.errors import InferdError, Internal, InvalidArgument
from inferd.features import FeatureJoin, FeatureStores, plan_join
from inferd.local import Loaded, in_process
from inferd.metrics import FeatureStats
from inferd.offline.scoring import Scorer, in_thread
from inferd.offline.sinks import PartStore, output_format
from inferd.offline.sources import (
    Chunk,
    Layout,
    find_inputs,
    plan_layout,
    read_chunks,
    row_bytes,
    total_rows,
)
from inferd.repository import resolve_version
from inferd.runtimes import Model
from inferd.types import DEFAULT_SIGNATURE, Signature, Tensors

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_IN_FLIGHT_CHUNKS = 8
"""Chunks alive at once: one being read, two queued, two scored, two queued, one being written."""
_SCORED_CHUNKS = 2
"""Chunks scored at once, so that the inference threads go on to the next chunk's batches while
the last batches of one finish, instead of waiting for the slowest."""
_MAX_CHUNK_ROWS = 65536
_BATCH_LOOKUP_TIMEOUT_MS = 30_000.0
"""Least lookup timeout for a chunk's features: one round trip carries a whole chunk's entities."""


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """One ``inferd batch`` job; see ``inferd batch --help`` for each option."""

    model: Path
    input: str
    output: Path
    model_name: str | None = None
    version: int | None = None
    signature: str = DEFAULT_SIGNATURE
    batch_size: int = 0
    """Rows per predict call; 0 picks one with a short probe."""
    threads: int = 0
    """Predict calls at once; 0 is one per CPU."""
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    rejects: Path | None = None
    resume: bool = False
    memory_budget_mb: float = 1024.0
    price_per_hour: float = 0.0
    progress: str = "auto"
    """``bar`` (rich), ``log`` (a line every ``log_interval_s``), ``none``, or ``auto``: a bar
    on a terminal, log lines otherwise."""
    log_interval_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Summary:
    """What a job did. ``rows`` were scored in this run, ``resumed_rows`` by an earlier one;
    ``seconds`` is the whole run, ``rows_per_s`` counts the scoring only (model load excluded)."""

    model: str
    rows: int
    rejected: int
    resumed_rows: int
    seconds: float
    rows_per_s: float
    cpu_s: float
    peak_memory_bytes: int
    cost: float
    batch_size: int
    chunk_rows: int

    def lines(self) -> list[str]:
        return [
            f"model {self.model}: {self.rows} rows scored, {self.rejected} rejected"
            + (f", {self.resumed_rows} done by an earlier run" if self.resumed_rows else ""),
            f"{self.seconds:.2f} s, {self.rows_per_s:,.0f} rows/s, batch size {self.batch_size}, "
            f"chunks of {self.chunk_rows} rows",
            f"CPU {self.cpu_s:.2f} s, peak memory {self.peak_memory_bytes / 2**20:.0f} MiB"
            + (f", cost {self.cost:.6f} at the given price per hour" if self.cost else ""),
        ]

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))


@dataclass(frozen=True, slots=True)
class Job:
    """What an ``Engine`` scores: the job's chunks are ``read_chunks(layout, request,
    chunk_rows)``, numbered from 0; those in ``done`` were written by an earlier run."""

    options: BatchOptions
    layout: Layout
    request: Signature
    chunk_rows: int
    outputs: tuple[str, ...]
    done: frozenset[int]


@dataclass(frozen=True, slots=True)
class Scored:
    """One chunk back from an ``Engine``: ``outputs`` for its good rows (its rejects moved to
    ``chunk.rejects``), or None for a chunk in ``Job.done`` (only ``chunk.rows`` counts);
    ``batch_size`` the rows per predict call that scored it."""

    chunk: Chunk
    outputs: Tensors | None
    batch_size: int


Engine: TypeAlias = Callable[[Job], AsyncIterator[Scored]]
"""Reads and scores a job's chunks elsewhere (in any order); raises ``InferdError`` as ``run``."""


def run(options: BatchOptions, engine: Engine | None = None) -> Summary:
    """Run one job to the end, scoring in this process or with ``engine``.

    Raises:
        InferdError: a model that does not load (MODEL_LOAD), inputs or options that do not fit
            the model, such as a missing column (INVALID_ARGUMENT), all before any row is scored.
    """
    return asyncio.run(_run(options, engine))


def open_scorer(options: BatchOptions, loaded: Loaded, stores: FeatureStores, threads: int) -> Scorer:
    """The scorer ``run`` uses for ``loaded`` (its signature, feature join and chosen outputs),
    for an engine that scores chunks in another process. The join's store is opened in
    ``stores``, which the caller closes."""
    signature = _model_signature(loaded.model, options.signature)
    join = _feature_join(loaded.ref.name, loaded.settings.features, loaded.model, stores)
    fmt = output_format(options.output)
    outputs = _chosen_outputs(signature, options.outputs, fmt)
    return Scorer(loaded.model, signature, join, outputs, options.batch_size, threads, loaded.pool)


async def _run(options: BatchOptions, engine: Engine | None = None) -> Summary:
    started, cpu_started = time.monotonic(), time.process_time()
    plan = resolve_version(options.model, options.model_name, options.version)
    fmt = output_format(options.output)
    threads = options.threads or os.cpu_count() or 1
    async with in_process(plan, threads) as loaded:
        status, model = loaded.status, loaded.model
        stores = FeatureStores()
        try:
            signature = _model_signature(model, options.signature)
            join = _feature_join(plan.name, loaded.settings.features, model, stores)
            request = signature if join is None else join.request_signature(signature)
            outputs = _chosen_outputs(signature, options.outputs, fmt)
            files, kind = find_inputs(options.input)
            layout = plan_layout(request, files, kind, options.id_column, options.keep_columns)
            budget_rows = int(
                options.memory_budget_mb * 2**20 / (_IN_FLIGHT_CHUNKS * (4 * row_bytes(signature) + 256))
            )
            chunk_rows = max(1, min(_MAX_CHUNK_ROWS, budget_rows), options.batch_size)
            job = {
                "model": str(plan.aspired[status.version].path),
                "fingerprint": plan.aspired[status.version].fingerprint,
                "signature": signature.name,
                "inputs": [str(p.resolve()) for p in files],
                "outputs": outputs,
                "id_column": layout.id_name,
                "keep": list(layout.keep),
                "chunk_rows": chunk_rows,
            }
            total = total_rows(layout)
            store = PartStore(options.output, job, options.resume)
            chunk_rows = int(store.job["chunk_rows"])
            scorer = Scorer(model, signature, join, outputs, options.batch_size, threads, loaded.pool)
            progress = _Progress(options.progress, total, options.log_interval_s)
            done = store.done()
            scoring_started = time.monotonic()
            try:
                try:
                    if engine is None:
                        rows, resumed = await _pipeline(
                            read_chunks(layout, request, chunk_rows),
                            done,
                            scorer,
                            store,
                            layout.id_name,
                            progress,
                        )
                    else:
                        work = Job(options, layout, request, chunk_rows, tuple(outputs), frozenset(done))
                        rows, resumed, scorer.batch_size = await _write_scored(
                            engine(work), store, layout.id_name, progress
                        )
                finally:
                    progress.close()
                scoring_s = time.monotonic() - scoring_started
                rejects = options.rejects or _default_rejects(options.output)
                rejected = await _stage(
                    "merging the parts into " + str(options.output), store.finish, rejects
                )
            except InferdError as exc:  # say what became of the parts folder
                exc.message = f"{exc.message}; {store.abandon()}"
                exc.args = (exc.message,)
                raise
            except BaseException:
                store.abandon()
                raise
        finally:
            await stores.close()
    seconds = time.monotonic() - started
    return Summary(
        model=f"{plan.name}:{status.version}",
        rows=rows,
        rejected=rejected,
        resumed_rows=resumed,
        seconds=seconds,
        rows_per_s=rows / scoring_s if scoring_s else 0.0,
        cpu_s=time.process_time() - cpu_started,
        peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        cost=options.price_per_hour * seconds / 3600,
        batch_size=scorer.batch_size,
        chunk_rows=chunk_rows,
    )


def _default_rejects(output: Path) -> Path:
    return output.with_name(output.name + ".rejects.jsonl")


def _model_signature(model: Model, name: str) -> Signature:
    signature = model.signatures.get(name)
    if signature is None:
        raise InvalidArgument(
            f"--signature: the model has no signature {name!r}; it has {sorted(model.signatures)}"
        )
    return signature


def _feature_join(
    name: str, settings: FeatureSettings | None, model: Model, stores: FeatureStores
) -> FeatureJoin | None:
    """The model's feature join, as the server makes it, but with a lookup timeout fit for a
    chunk's worth of entities."""
    if settings is None:
        return None
    settings = dataclasses.replace(
        settings, lookup_timeout_ms=max(settings.lookup_timeout_ms, _BATCH_LOOKUP_TIMEOUT_MS)
    )
    store = stores.open(settings)
    return FeatureJoin(name, settings, plan_join(settings, model.signatures), store, FeatureStats())


def _chosen_outputs(signature: Signature, wanted: tuple[str, ...], fmt: str) -> list[str]:
    names = [spec.name for spec in signature.outputs]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise InvalidArgument(
            f"--outputs: signature {signature.name!r} has no output(s) {unknown}; it has {names}"
        )
    chosen = list(wanted) or names
    if fmt == "npy" and len(chosen) != 1:
        raise InvalidArgument(f".npy output holds one tensor; choose one of {chosen} with --outputs")
    return chosen


async def _pipeline(
    chunks: Iterator[Chunk],
    done: set[int],
    scorer: Scorer,
    store: PartStore,
    id_name: str,
    progress: _Progress,
) -> tuple[int, int]:
    """Read, score and write overlapped; returns (rows scored, rows skipped as already done).

    A failure in any stage cancels the others and is raised (as an ``InferdError`` naming the
    stage): the job ends, it never waits on a stage that has stopped.
    """
    read_q: asyncio.Queue[Chunk | None] = asyncio.Queue(maxsize=2)
    write_q: asyncio.Queue[tuple[Chunk, Tensors] | None] = asyncio.Queue(maxsize=2)
    counts = {"rows": 0, "resumed": 0}

    with (
        ThreadPoolExecutor(1, "inferd-batch-read") as reader,
        ThreadPoolExecutor(1, "inferd-batch-write") as writer,
    ):
        # The end-of-input markers go only on success: after a failure the task group cancels
        # the other stages, and a put into a queue nobody reads any more would never return.
        async def read() -> None:
            while (chunk := await _stage("reading the input", next, chunks, None, pool=reader)) is not None:
                await read_q.put(chunk)
            await read_q.put(None)

        async def score() -> None:
            scoring: deque[asyncio.Task[tuple[Chunk, Tensors]]] = deque()
            try:
                while (chunk := await read_q.get()) is not None:
                    if chunk.index in done:
                        counts["resumed"] += chunk.rows
                        progress.advance(chunk.rows)
                        continue
                    scoring.append(asyncio.create_task(score_chunk(scorer, chunk)))
                    if len(scoring) == _SCORED_CHUNKS:
                        await write_q.put(await scoring.popleft())
                while scoring:
                    await write_q.put(await scoring.popleft())
            except BaseException:
                for task in scoring:
                    task.cancel()
                await asyncio.gather(*scoring, return_exceptions=True)
                raise
            await write_q.put(None)

        async def write() -> None:
            while (item := await write_q.get()) is not None:
                chunk, outputs = item
                first = chunk.numbers[0] if len(chunk.numbers) else "-"
                what = f"writing chunk {chunk.index} (rows from {first})"
                await _stage(what, store.write, chunk, outputs, id_name, pool=writer)
                counts["rows"] += len(chunk.ids)
                progress.advance(chunk.rows)

        try:
            async with asyncio.TaskGroup() as group:
                for stage in (read, score, write):
                    group.create_task(stage())
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
    return counts["rows"], counts["resumed"]


async def _write_scored(
    scored: AsyncIterator[Scored], store: PartStore, id_name: str, progress: _Progress
) -> tuple[int, int, int]:
    """Write an engine's chunks as they come; returns (rows scored, rows skipped as already
    done, the batch size of the last chunk scored)."""
    rows = resumed = batch_size = 0
    with ThreadPoolExecutor(1, "inferd-batch-write") as writer:
        async for item in scored:
            chunk = item.chunk
            if item.outputs is None:
                resumed += chunk.rows
            else:
                first = chunk.numbers[0] if len(chunk.numbers) else "-"
                what = f"writing chunk {chunk.index} (rows from {first})"
                await _stage(what, store.write, chunk, item.outputs, id_name, pool=writer)
                rows += len(chunk.ids)
                batch_size = item.batch_size or batch_size
            progress.advance(chunk.rows)
    return rows, resumed, batch_size


async def _stage(what: str, function: Callable[..., _T], *args: Any, pool: Executor | None = None) -> _T:
    """``function(*args)`` on ``pool`` (a default thread when None), its unexpected errors turned
    into ``Internal`` naming ``what`` failed.

    Every failure reaches the task group as an exception (``in_thread`` wraps a
    ``StopIteration``, which asyncio would drop), so no stage is left waiting.

    Raises:
        InferdError: ``function``'s own (a reader's InvalidArgument, a store's Unavailable), or
            Internal for anything else, with its type and message.
    """

    def call() -> _T:
        try:
            return function(*args)
        except InferdError:
            raise
        except Exception as exc:  # any library's error: say which stage, keep the cause
            raise Internal(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    return await in_thread(pool, call)


async def score_chunk(scorer: Scorer, chunk: Chunk) -> tuple[Chunk, Tensors]:
    """``scorer.score(chunk)``, an unexpected error named with the chunk (a model that raised)."""
    try:
        return await scorer.score(chunk)
    except InferdError:
        raise
    except Exception as exc:  # the model's framework, a feature store client
        rows = f"rows {chunk.numbers[0]}-{chunk.numbers[-1]}" if len(chunk.numbers) else "no rows"
        raise Internal(
            f"scoring chunk {chunk.index} ({chunk.source}, {rows}) failed: {type(exc).__name__}: {exc}"
        ) from exc


class _Progress:
    """A rich progress bar on a terminal, or a log line every ``interval_s`` seconds."""

    def __init__(self, mode: str, total: int | None, interval_s: float) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self._mode, self._total, self._interval_s = mode, total, interval_s
        self._done, self._started = 0, time.monotonic()
        self._logged = self._started
        self._bar = None
        if mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("scoring"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task("rows", total=total, rate="-")
            self._bar.start()

    def advance(self, rows: int) -> None:
        self._done += rows
        now = time.monotonic()
        rate = self._done / max(now - self._started, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, advance=rows, rate=f"{rate:,.0f}")
        elif self._mode == "log" and now - self._logged >= self._interval_s:
            self._logged = now
            if self._total:
                eta = (self._total - self._done) / rate if rate else math.inf
                log.info(
                    "%d/%d rows (%.0f%%), %.0f rows/s, ETA %.0f s",
                    self._done,
                    self._total,
                    100 * self._done / self._total,
                    rate,
                    eta,
                )
            else:
                log.info("%d rows, %.0f rows/s", self._done, rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
