"""``inferd batch --engine ray``: the same job as ``inferd batch``, its chunks scored by a pool of
Ray Data actors.

The Ray Data pipeline has two stages:

- one reading task, pinned to this machine's node (where the inputs are, remote ones copied in
  by ``inferd batch`` as for the local engine), turns the inputs into chunks with ``inferd
  batch``'s own reader (``offline.sources.read_chunks``), one Ray Data row per chunk (a chunk
  finished by an earlier run, ``--resume``, goes as its number of rows only);
- ``map_batches`` with ``ChunkScorer``, an actor class: each actor loads the model once (the
  same runtime, ``inferd.toml``, warm-up and feature join as ``inferd batch``) and scores chunks
  with ``inferd batch``'s ``Scorer`` (input checks, rejects row by row, batch size probe).

This process takes the scored chunks as they come (in any order) and writes them with ``inferd
batch``'s part store, so that the output, the rejects file, ``--resume`` and the exit statuses
are the local engine's. Ray Data's streaming executor bounds the chunks in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from inferd import offline
from inferd.config import model_location
from inferd.errors import InferdError, Internal
from inferd.features import FeatureStores
from inferd.local import in_process
from inferd.offline.scoring import Scorer
from inferd.offline.sources import Chunk, read_chunks
from inferd.ray.deployment import check_reachable
from inferd.repository import resolve_version
from inferd.storage import Scratch

log = logging.getLogger(__name__)


def engine(model: str, address: str, actors: int) -> offline.Engine:
    """An ``offline.Engine`` scoring on the Ray cluster at ``address`` ("" starts a local one)
    with ``actors`` actors (0: as many as the cluster's CPUs allow, ``--threads`` CPUs each).

    ``model`` is the MODEL argument as given: each actor reads it itself, so a local path must
    be one every node can read (the same path on a shared file system), or an object-store URI.
    """
    location = model_location(model)
    model = str(location.resolve()) if isinstance(location, Path) else model

    async def scored(job: offline.Job) -> AsyncIterator[offline.Scored]:
        check_reachable(address)
        import ray

        # "local": a new one-node Ray; None would join any cluster this machine last started,
        # and wait on a dead one's address, left behind when its nodes were killed.
        ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False)
        try:
            batches = iter(_dataset(job, model, actors).iter_batches(batch_size=1, batch_format="numpy"))
            try:
                while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                    yield _unpacked(batch["scored"][0])
            finally:  # stops the pipeline (its actors) while Ray is still connected
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
        except InferdError:
            raise
        except Exception as exc:  # Ray's own failures: a dead actor, a lost node, a worker's error
            raise Internal(f"scoring on Ray failed: {type(exc).__name__}: {exc}") from exc
        finally:
            ray.shutdown()

    return scored


def _dataset(job: offline.Job, model: str, actors: int) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    threads = job.options.threads or 1
    if not actors:
        cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
        actors = max(1, int(cpus // threads))
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # One chunk per Ray Data block. By default a block holds up to 128 MiB, many chunks, and an
    # actor hands back its block only once every chunk in it is scored: nothing reached the part
    # store (nor --resume) until the end of a job, and whole blocks of chunks were in memory.
    ray.data.DataContext.get_current().target_max_block_size = 1
    # One row made here (no read task, which would wait for a CPU the scoring actors hold).
    reader = ray.data.from_items([{"start": 0}]).map_batches(
        _Reader,
        fn_constructor_args=(job, os.getcwd()),
        batch_size=1,
        concurrency=1,
        num_cpus=0,
        scheduling_strategy=here,
    )
    return reader.map_batches(
        ChunkScorer,
        fn_constructor_args=(job.options, model, threads),
        batch_size=1,
        concurrency=actors,
        num_cpus=threads,
    )


class _Reader:
    """The reading stage: yields one row per chunk, ``{"chunk": pickled chunk}``. It runs in its
    own actor on this machine's node, in ``cwd`` (this process's working directory), so that
    relative input paths name the files they name here, and chunks and rejects name them as
    the local engine does."""

    def __init__(self, job: offline.Job, cwd: str) -> None:
        os.chdir(cwd)
        self._job = job

    def __call__(self, _: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        job = self._job
        for chunk in read_chunks(job.layout, job.request, job.chunk_rows):
            if chunk.index in job.done:  # only its row count matters
                chunk = Chunk(chunk.index, chunk.rows, chunk.source, _NONE, _NONE, {}, {}, [])
                yield _packed(("done", chunk))
            else:
                yield _packed(("score", chunk))


_NONE = np.empty(0, dtype=np.int64)


class ChunkScorer:
    """A Ray Data actor: the model loaded once, chunks scored with ``inferd batch``'s scorer.

    A chunk comes back as ``("scored", chunk, outputs, batch size)``, a finished one as
    ``("done", chunk, None, 0)``, and an ``InferdError`` as ``("error", error)`` so that this
    process raises it as the local engine would.
    """

    def __init__(self, options: offline.BatchOptions, model: str, threads: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._scratch = Scratch()
        self._stores = FeatureStores()
        self._scorer: Scorer | None = None
        self._error: InferdError | None = None
        try:
            path = self._scratch.model(model, "MODEL", options.model_name, options.version)
            plan = resolve_version(path, options.model_name, options.version)
            self._loaded = in_process(plan, threads)
            loaded = self._loop.run_until_complete(self._loaded.__aenter__())
            self._scorer = offline.open_scorer(options, loaded, self._stores, threads)
        except InferdError as error:  # raised by this process on the first chunk
            self._error = error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kind, chunk = pickle.loads(batch["chunk"][0])
        if kind == "done":
            return _packed(("done", chunk, None, 0), "scored")
        if self._error is not None or self._scorer is None:
            return _packed(("error", self._error), "scored")
        try:
            scored, outputs = self._loop.run_until_complete(offline.score_chunk(self._scorer, chunk))
        except InferdError as error:
            return _packed(("error", error), "scored")
        return _packed(("scored", scored, outputs, self._scorer.batch_size), "scored")

    def __del__(self) -> None:
        if self._scorer is not None:
            self._loop.run_until_complete(self._loaded.__aexit__(None, None, None))
        self._loop.run_until_complete(self._stores.close())
        self._scratch.close()
        self._loop.close()


def _packed(value: object, column: str = "chunk") -> dict[str, np.ndarray]:
    cell = np.empty(1, dtype=object)
    cell[0] = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return {column: cell}


def _unpacked(data: bytes) -> offline.Scored:
    value = pickle.loads(data)
    if value[0] == "error":
        error: InferdError = value[1]
        raise error
    _, chunk, outputs, batch_size = value
    return offline.Scored(chunk, outputs, batch_size)
