"""A loaded model version ready to serve, and the factory that builds one in a load thread.

A ``Servable`` is everything one version needs to answer requests: the model, one ``Batcher``
per signature (when batching is on for it), its ``FeatureJoin`` (plan built once, at load), its
prediction cache, and the bound on its unbatched calls in flight. ``ServableFactory.load`` builds
it whole in the manager's load thread: it loads the model with its runtime, checks the model's
``[features]`` against its signatures, warms the model up with one call per signature, then
builds the rest; when a step fails, what was made is closed and the load fails with
``ModelLoadError``. ``close`` frees all of it (the model, the batchers, the caches and the
metric label sets of the version), so a retired version holds nothing.

Thread-safety: built in a load thread, used from the event loop's thread, closed (once, by its
manager, when no request holds it) in one of the manager's executor threads.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from inferd.batching import Batcher
from inferd.config import BatchingParameters, ModelSettings
from inferd.errors import DeadlineExceeded, ModelLoadError, Unavailable
from inferd.features import FeatureJoin, FeatureStores, PredictionCache, plan_join
from inferd.metrics import Histogram, HitCounter, Metrics
from inferd.placement import CallCosts
from inferd.runtimes import Model, Supervised, load_model
from inferd.statistics import VersionStatistics
from inferd.threads import ThreadPool
from inferd.types import ModelId, Signature, Tensors, TensorSpec

log = logging.getLogger(__name__)

ModelLoader = Callable[[Path, ModelSettings, str | None], tuple[Model, str]]
"""Loads a version folder with its runtime: ``runtimes.load_model`` in a server."""


class Servable:
    """One loaded version ready to serve; built by ``ServableFactory.load``.

    Attributes:
        id: the version.
        model: the loaded model; no call follows ``close``.
        runtime: the runtime's name (``onnx``, ``sklearn``, ...).
        settings: the model's settings (``inferd.toml``).
        batching: the batching in force for this version (its own or the server's), or None.
        join: the feature join, None when the model has no ``[features]``.
        predictions: the prediction cache, None when the model has none.
        prediction_counts: hits and misses of ``predictions``.
        statistics: the version's counts for Triton's statistics extension (requests and model
            executions).
    """

    __slots__ = (
        "_batchers",
        "_call_costs",
        "_closed",
        "_in_flight",
        "_max_in_flight",
        "_on_close",
        "_threads",
        "batching",
        "id",
        "join",
        "model",
        "prediction_counts",
        "predictions",
        "runtime",
        "settings",
        "statistics",
    )

    def __init__(
        self,
        id: ModelId,
        model: Model,
        runtime: str,
        settings: ModelSettings,
        threads: ThreadPool,
        max_in_flight: int,
        on_close: Callable[[Servable], None] = lambda servable: None,
    ) -> None:
        self.id = id
        self.model = model
        self.runtime = runtime
        self.settings = settings
        self.batching: BatchingParameters | None = None
        self.join: FeatureJoin | None = None
        self.predictions: PredictionCache | None = None
        self.prediction_counts = HitCounter()
        self.statistics = VersionStatistics(id)
        self._batchers: dict[str, Batcher] = {}
        self._threads = threads
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._call_costs: dict[str, CallCosts] = {}  # by signature
        self._on_close = on_close
        self._closed = False

    def __str__(self) -> str:
        return f"{self.id} ({self.runtime} runtime on {self.settings.device})"

    @property
    def batchers(self) -> dict[str, Batcher]:
        """Signature name -> its batcher; empty when batching is off or once closed."""
        return self._batchers

    def request_signature(self, signature: Signature) -> Signature:
        """What a caller sends for ``signature``: itself, or the request side of its feature join."""
        return signature if self.join is None else self.join.request_signature(signature)

    async def run(
        self, signature: str, inputs: Tensors, deadline: float | None
    ) -> tuple[Tensors, float, float, int]:
        """Predict ``inputs`` (already conformed and joined): through the signature's batcher
        when there is one and every input has the same rows, else directly: on this (the event
        loop's) thread when the signature's recent calls say it is fast (``CallCosts.inline``),
        otherwise on an inference thread (always for a signature's first call).

        Returns:
            The outputs, the seconds queued (for a batch or a thread), the seconds of predict,
            and the rows of the batch the model computed (the request's own without a batcher).

        Raises:
            InvalidArgument: more rows than the batching queue holds.
            Unavailable: the batching queue is full, or too many unbatched calls are in flight.
            DeadlineExceeded: the deadline passed while the call waited.
            Exception: whatever the model raised.
        """
        rows = _common_rows(inputs)
        batcher = self._batchers.get(signature) if rows is not None else None
        if batcher is not None:
            assert rows is not None
            return await batcher.submit(inputs, rows, deadline)
        if self._in_flight >= self._max_in_flight:
            raise Unavailable(f"model {self.id} has {self._in_flight} requests in flight; retry later")
        self._in_flight += 1
        enqueued = time.monotonic()
        costs = self.call_costs(signature)
        try:
            if costs.inline(rows or 1):
                result = _timed_predict(self.model, signature, inputs, enqueued, deadline)
            else:
                result = await self._threads.run(
                    _timed_predict, self.model, signature, inputs, enqueued, deadline
                )
        finally:
            self._in_flight -= 1
        costs.add(rows or 1, result[2])
        self.statistics.executed(rows or 1, result[2])
        return (*result, rows or 1)

    def call_costs(self, signature: str) -> CallCosts:
        """The recent model time per row of ``signature``'s calls, which its batcher shares."""
        costs = self._call_costs.get(signature)
        if costs is None:
            costs = self._call_costs[signature] = CallCosts(not isinstance(self.model, Supervised))
        return costs

    def supervise(self, name: str, on_exit: Callable[[str], None]) -> None:
        """Report the death of the model's worker process (``isolation = "process"``) to
        ``on_exit``; nothing is reported for a model that runs in this process."""
        if isinstance(self.model, Supervised):
            self.model.supervise(name, on_exit)

    def close(self) -> None:
        """Free the version: its batchers, feature join (entity cache), prediction cache, metric
        label sets, then the model. Call once no request uses it; later calls do nothing.

        Raises:
            Exception: whatever the model's ``close`` raised (everything else is freed first).
        """
        if self._closed:
            return
        self._closed = True
        for batcher in self._batchers.values():
            batcher.close()
        self._batchers = {}
        self.join = None
        self.predictions = None
        self._on_close(self)
        self.model.close()

    def _predict(self, signature: str) -> Callable[[Tensors], Tensors]:
        def predict(inputs: Tensors) -> Tensors:
            if self._closed:
                raise Unavailable(f"model {self.id} was unloaded; retry")
            return self.model.predict(signature, inputs)

        return predict


class ServableFactory:
    """Builds servables for a ``ModelManager`` (its loader) and reports their batchers' gauges.

    Args:
        threads: the threads unbatched calls run on (each batcher has its own).
        batching: server-wide batching (``--enable_batching``); a model's ``[batching]`` wins.
        max_in_flight: per version, unbatched calls running or waiting for a thread beyond which
            requests are refused with UNAVAILABLE.
        metrics: where the servables count batches, cache hits and lookups; by default a
            collector of their own that nobody reads.
        features: opens the stores of models with ``[features]``; owned by the caller.
        load: loads a version folder with its runtime.
    """

    def __init__(
        self,
        threads: ThreadPool,
        batching: BatchingParameters | None = None,
        max_in_flight: int = 256,
        metrics: Metrics | None = None,
        features: FeatureStores | None = None,
        load: ModelLoader = load_model,
    ) -> None:
        self._threads = threads
        self._batching = batching
        self._max_in_flight = max_in_flight
        self._metrics = metrics = metrics or Metrics()
        self._features = features
        self._load = load
        self._live: dict[ModelId, Servable] = {}
        metrics.gauge(
            "inferd_queue_rows",
            "Rows waiting in batching queues or in batches not started",
            self._queued_rows,
        )
        metrics.gauge("inferd_batcher_target_batch_size", "Batch size the batcher aims for", self._targets)
        metrics.gauge("inferd_batcher_wait_seconds", "Longest wait for a batch to fill", self._waits)

    def live(self) -> list[Servable]:
        """The servables built and not yet closed."""
        return list(self._live.values())

    def load(self, id: ModelId, version_dir: Path, settings: ModelSettings, platform: str | None) -> Servable:
        """Load ``version_dir`` and make it ready to serve; runs in a load thread.

        Raises:
            ModelLoadError: the runtime could not load the model, the ``[features]`` do not fit its
                signatures (or a Redis store lacks redis-py), or the warm-up call failed.
            InferdError, Exception: as the runtime raised them.
        """
        features = settings.features
        if features is not None and "://" in features.store and importlib.util.find_spec("redis") is None:
            raise ModelLoadError("[features] a Redis store needs redis-py: pip install 'inferd[redis]'")
        if features is not None and self._features is None:
            raise ModelLoadError(f"model {id} declares [features] but this process has no feature stores")
        model, runtime = self._load(version_dir, settings, platform)
        try:
            plans = plan_join(features, model.signatures) if features is not None else None
            if settings.warmup:
                _warm_up(model)
            servable = Servable(
                id, model, runtime, settings, self._threads, self._max_in_flight, self._closed
            )
            if features is not None and plans is not None and self._features is not None:
                store = self._features.open(features)
                stats = self._metrics.features(id.name, store.name)
                servable.join = FeatureJoin(id.name, features, plans, store, stats)
            number = str(id.version)
            if size := settings.prediction_cache_size:
                servable.predictions = PredictionCache(size, settings.prediction_cache_bytes)
                servable.prediction_counts = self._metrics.prediction_cache(id.name, number)
            servable.batching = params = settings.batching or self._batching
            if params is not None:
                on_batch = _batch_recorder(servable.statistics, self._metrics.batch_size(id.name, number))
                for name in model.signatures:
                    servable.batchers[name] = Batcher(
                        servable._predict(name), params, on_batch, servable.call_costs(name)
                    )
        except Exception:
            model.close()
            raise
        self._live[id] = servable
        return servable

    def _closed(self, servable: Servable) -> None:
        # A version loaded again (its files changed, its worker died) may already have replaced
        # this one: its label sets are the new one's then.
        if self._live.get(servable.id) is not servable:
            return
        del self._live[servable.id]
        self._metrics.forget_version(servable.id.name, str(servable.id.version))

    def _batcher_readings(self) -> Iterator[tuple[tuple[str, str], list[Batcher]]]:
        for servable in self.live():
            batchers = list(servable.batchers.values())
            if batchers:
                yield (servable.id.name, str(servable.id.version)), batchers

    def _queued_rows(self) -> Iterator[tuple[tuple[str, str], float]]:
        return ((labels, float(sum(b.waiting_rows for b in bs))) for labels, bs in self._batcher_readings())

    def _targets(self) -> Iterator[tuple[tuple[str, str], float]]:
        return (
            (labels, float(max(b.target_batch_size for b in bs))) for labels, bs in self._batcher_readings()
        )

    def _waits(self) -> Iterator[tuple[tuple[str, str], float]]:
        return ((labels, max(b.wait_s for b in bs)) for labels, bs in self._batcher_readings())


def _warm_up(model: Model) -> None:
    """One call of zeros per signature whose input shapes are all declared.

    Raises:
        ModelLoadError: a call failed; the message says how to turn warm-up off.
    """
    try:
        for name, signature in model.signatures.items():
            if _zeros_fit(signature):
                model.predict(name, {spec.name: _warm_up_tensor(spec) for spec in signature.inputs})
    except Exception as exc:
        raise ModelLoadError(
            f"the warm-up call failed: {type(exc).__name__}: {exc} "
            "(set warmup = false in inferd.toml if zeros are not a valid input)"
        ) from exc


def _zeros_fit(signature: Signature) -> bool:
    """Whether a call with zeros can warm ``signature`` up: every input shape declared, and inferd
    judges them. Signatures whose runtime judges shapes itself (TensorFlow's, whose declared shapes
    may not be the graph's and whose string inputs are mostly serialized ``tf.Example``s) are warmed
    up as TF Serving warms them, by the runtime from the SavedModel's warm-up file."""
    return not signature.runtime_checks_shapes and all(spec.shape is not None for spec in signature.inputs)


def _warm_up_tensor(spec: TensorSpec) -> np.ndarray:
    assert spec.shape is not None
    shape = tuple(1 if dim < 0 else dim for dim in spec.shape)
    if spec.dtype.kind == "O":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=spec.dtype)


def _timed_predict(
    model: Model, signature: str, inputs: Tensors, enqueued: float, deadline: float | None
) -> tuple[Tensors, float, float]:
    """Runs in a pool thread: drop the call if its deadline passed while it waited for a thread."""
    started = time.monotonic()
    if deadline is not None and started > deadline:
        raise DeadlineExceeded("the request's deadline passed before a thread was free to compute it")
    outputs = model.predict(signature, inputs)
    return outputs, started - enqueued, time.monotonic() - started


def _common_rows(inputs: Tensors) -> int | None:
    """The batch size shared by every input (axis 0), or None when they differ or are scalars."""
    sizes = {value.shape[0] if value.ndim else None for value in inputs.values()}
    return sizes.pop() if len(sizes) == 1 else None


def _batch_recorder(statistics: VersionStatistics, histogram: Histogram) -> Callable[[int, float], None]:
    def record(rows: int, latency_s: float) -> None:
        statistics.executed(rows, latency_s)
        histogram.observe(rows)

    return record
