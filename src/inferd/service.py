"""InferenceService: the one core that every protocol adapter calls.

It resolves the version a request asks for, checks the inputs against the signature (names,
dtypes, shapes), runs the model on the inference thread pool while holding a lease on the
version, and checks what the model returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from inferd.batching import Batcher
from inferd.config import BatchingParameters
from inferd.errors import DeadlineExceeded, InferdError, Internal, InvalidArgument, NotFound, Unavailable
from inferd.features import FeatureJoin, FeatureStores, PredictionCache, plan_join
from inferd.manager import ModelManager, ServedVersion
from inferd.metrics import FeatureStats, Histogram, HitCounter, Metrics
from inferd.runtimes import Model
from inferd.statistics import VersionStatistics
from inferd.types import (
    DEFAULT_SIGNATURE,
    InferenceRequest,
    InferenceResponse,
    Method,
    ModelMetadata,
    ModelRef,
    Signature,
    Tensors,
    TensorSpec,
    VersionState,
    VersionStatus,
    dtype_of,
    integer_range_error,
)

log = logging.getLogger(__name__)

_ACCEPTED_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b", "O": "OUS"}
"""Signature dtype kind -> kinds of decoded values it accepts (ints are accepted as floats)."""


@dataclass(slots=True, eq=False)
class _Lane:
    """Per served version: its batchers (one per signature), its unbatched calls in flight, its
    feature join and its prediction cache (None when the model has none)."""

    join: FeatureJoin | None
    predictions: PredictionCache | None
    prediction_counts: HitCounter
    batchers: dict[str, Batcher] = field(default_factory=dict)
    in_flight: int = 0


class InferenceService:
    """Validate, predict, measure. Call from the event loop's thread.

    Args:
        batching: server-wide batching (``--enable_batching``); a model's ``[batching]`` wins.
        max_in_flight: per version, unbatched calls running or waiting for a thread beyond which
            requests are refused with UNAVAILABLE.
        features: opens the stores of models with ``[features]``; owned by the caller.
    """

    def __init__(
        self,
        manager: ModelManager,
        executor: Executor,
        batching: BatchingParameters | None = None,
        max_in_flight: int = 256,
        metrics: Metrics | None = None,
        features: FeatureStores | None = None,
    ) -> None:
        self._manager = manager
        self._features = features
        self._executor = executor
        self._batching = batching
        self._max_in_flight = max_in_flight
        self._metrics = metrics
        self._lanes: weakref.WeakKeyDictionary[ServedVersion, _Lane] = weakref.WeakKeyDictionary()
        self._statistics: weakref.WeakKeyDictionary[ServedVersion, VersionStatistics] = (
            weakref.WeakKeyDictionary()
        )
        if metrics:
            metrics.gauge("inferd_queue_rows", "Rows waiting in batching queues", self._queued_rows)
            metrics.gauge(
                "inferd_batcher_target_batch_size", "Batch size the batcher aims for", self._targets
            )
            metrics.gauge("inferd_batcher_wait_seconds", "Longest wait for a batch to fill", self._waits)

    def knows(self, name: str) -> bool:
        """True when ``name`` is a configured model (for bounded metric labels)."""
        return name in self._manager.names()

    def signature(self, ref: ModelRef, name: str | None, method: Method = Method.PREDICT) -> Signature:
        """The signature a request names, or the default one for ``method``.

        With no name, PREDICT takes ``serving_default``; CLASSIFY and REGRESS take
        ``serving_default`` when it has that method, else the first signature that has it.

        Raises:
            NotFound: unknown model, version or label.
            InvalidArgument: unknown signature, or one whose method is not ``method``.
        """
        with self._manager.lease(ref) as version:
            return self._request_signature(version, _find_signature(version, name, method))

    async def infer(self, ref: ModelRef, request: InferenceRequest) -> InferenceResponse:
        """Run one request on the version ``ref`` resolves to, batched when batching is on.

        Raises:
            InferdError: bad input (INVALID_ARGUMENT), unknown model (NOT_FOUND), a full queue
                (UNAVAILABLE), a passed deadline (DEADLINE_EXCEEDED), and INTERNAL when the model
                fails in a way the input did not cause (logged here).
        """
        started = time.perf_counter()
        try:
            response = await self._infer(ref, request)
        except BaseException:
            self._count(ref, lambda statistics: statistics.failed(time.perf_counter() - started))
            raise
        total_s = time.perf_counter() - started
        self._count(
            ModelRef(ref.name, response.model_id.version),
            lambda statistics: statistics.succeeded(total_s, response.queue_s, response.predict_s),
        )
        return response

    def _count(self, ref: ModelRef, record: Callable[[VersionStatistics], None]) -> None:
        """Record a request in the statistics of the version ``ref`` names now, if it serves."""
        try:
            with self._manager.lease(ref) as version:
                record(self._statistics_of(version))
        except InferdError:
            pass  # an unknown model or version, or a draining server: nothing to count

    async def _infer(self, ref: ModelRef, request: InferenceRequest) -> InferenceResponse:
        with self._manager.lease(ref) as version:
            signature = _find_signature(version, request.signature_name, None)
            lane = self._lane(version)
            features_s = 0.0
            if lane.join is None:
                inputs = conform_inputs(signature, request.inputs)
            else:
                inputs = conform_inputs(lane.join.request_signature(signature), request.inputs)
                started = time.perf_counter()
                inputs = await lane.join.join(signature.name, inputs, request.deadline)
                features_s = time.perf_counter() - started
            if lane.predictions is not None:
                key = lane.predictions.key(signature.name, inputs)
                if (cached := lane.predictions.get(key)) is not None:
                    lane.prediction_counts.hits += 1
                    return InferenceResponse(version.id, dict(cached), request.id, features_s=features_s)
                lane.prediction_counts.misses += 1
            params = version.settings.batching or self._batching
            rows = _common_rows(inputs)
            try:
                if params is not None and rows is not None:
                    batcher = lane.batchers.get(signature.name) or self._new_batcher(
                        lane, version, signature, params
                    )
                    outputs, queue_s, predict_s = await batcher.submit(inputs, rows, request.deadline)
                else:
                    outputs, queue_s, predict_s = await self._call(
                        lane, version, signature.name, inputs, request
                    )
            except InferdError:
                raise
            except Exception:
                log.exception("%s failed on request %s", version.id, request.id)
                raise Internal(f"model {version.id} failed while predicting; see the server log") from None
            checked = _check_outputs(version, signature, outputs)
            if lane.predictions is not None:
                lane.predictions.put(key, checked)
            return InferenceResponse(version.id, checked, request.id, queue_s, predict_s, features_s)

    def _lane(self, version: ServedVersion) -> _Lane:
        lane = self._lanes.get(version)
        if lane is None:
            name, number = version.id.name, str(version.id.version)
            size = version.settings.prediction_cache_size
            lane = self._lanes[version] = _Lane(
                self._new_join(version),
                PredictionCache(size, version.settings.prediction_cache_bytes) if size else None,
                self._metrics.prediction_cache(name, number) if self._metrics and size else HitCounter(),
            )
        return lane

    def _new_join(self, version: ServedVersion) -> FeatureJoin | None:
        settings = version.settings.features
        if settings is None:
            return None
        if self._features is None:
            raise Internal(f"model {version.id} declares [features] but the server has no feature stores")
        assert version.model is not None
        store = self._features.open(settings)
        stats = self._metrics.features(version.id.name, store.name) if self._metrics else FeatureStats()
        plans = plan_join(settings, version.model.signatures)
        return FeatureJoin(version.id.name, settings, plans, store, stats)

    def _request_signature(self, version: ServedVersion, signature: Signature) -> Signature:
        join = self._lane(version).join
        return signature if join is None else join.request_signature(signature)

    async def _call(
        self, lane: _Lane, version: ServedVersion, signature: str, inputs: Tensors, request: InferenceRequest
    ) -> tuple[Tensors, float, float]:
        if lane.in_flight >= self._max_in_flight:
            raise Unavailable(f"model {version.id} has {lane.in_flight} requests in flight; retry later")
        model = version.model
        assert model is not None
        lane.in_flight += 1
        enqueued = time.monotonic()
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, _timed_predict, model, signature, inputs, enqueued, request.deadline
            )
        finally:
            lane.in_flight -= 1
        self._statistics_of(version).executed(_common_rows(inputs) or 1, result[2])
        return result

    def _new_batcher(
        self, lane: _Lane, version: ServedVersion, signature: Signature, params: BatchingParameters
    ) -> Batcher:
        # A weak reference: the batcher lives in a value of the weak-keyed lane table, so a strong
        # one would keep the version, and so the table entry, alive forever.
        version_ref = weakref.ref(version)

        def predict(inputs: Tensors) -> Tensors:
            served = version_ref()
            model = served.model if served else None
            if model is None:
                raise Unavailable(f"model {version.id} was unloaded; retry")
            return model.predict(signature.name, inputs)

        histogram = (
            self._metrics.batch_size(version.id.name, str(version.id.version)) if self._metrics else None
        )
        on_batch = _batch_recorder(self._statistics_of(version), histogram)
        batcher = lane.batchers[signature.name] = Batcher(predict, params, self._executor, on_batch)
        return batcher

    def _batchers(self) -> Iterator[tuple[tuple[str, str], Batcher]]:
        for version, lane in list(self._lanes.items()):
            for batcher in lane.batchers.values():
                yield (version.id.name, str(version.id.version)), batcher

    def _queued_rows(self) -> Iterator[tuple[tuple[str, str], float]]:
        return ((labels, float(b.queued_rows)) for labels, b in self._batchers())

    def _targets(self) -> Iterator[tuple[tuple[str, str], float]]:
        return ((labels, float(b.target_batch_size)) for labels, b in self._batchers())

    def _waits(self) -> Iterator[tuple[tuple[str, str], float]]:
        return ((labels, b.wait_s) for labels, b in self._batchers())

    def _statistics_of(self, version: ServedVersion) -> VersionStatistics:
        statistics = self._statistics.get(version)
        if statistics is None:
            statistics = self._statistics[version] = VersionStatistics(version.id)
        return statistics

    def statistics(self, name: str | None = None, version: int | None = None) -> list[VersionStatistics]:
        """The counts of every AVAILABLE version (zero for one never asked), by model name and
        version; narrowed to model ``name`` and its ``version`` when given. The objects are live:
        read them on the event loop's thread.

        Raises:
            NotFound: ``name`` is not served, or ``version`` is not one of its AVAILABLE versions.
        """
        names = self._manager.names() if name is None else [name]
        found = []
        for model in names:
            try:
                numbers = [
                    s.version
                    for s in self._manager.status(ModelRef(model, version))
                    if s.state is VersionState.AVAILABLE
                ]
            except NotFound:
                numbers = []
            if name is not None and not numbers:
                raise NotFound(
                    f"model {model!r} has no AVAILABLE version" + (f" {version}" if version else "")
                )
            for number in sorted(numbers):
                try:
                    with self._manager.lease(ModelRef(model, number)) as served:
                        found.append(self._statistics_of(served))
                except NotFound:
                    continue  # unloaded since the status was read
        return found

    def status(self, ref: ModelRef) -> list[VersionStatus]:
        """Version states of a model, highest version first (see ``ModelManager.status``)."""
        return self._manager.status(ref)

    def metadata(self, ref: ModelRef) -> ModelMetadata:
        """Signatures and runtime of the version ``ref`` resolves to."""
        with self._manager.lease(ref) as version:
            assert version.model is not None
            available = tuple(
                s.version
                for s in self._manager.status(ModelRef(ref.name))
                if s.state is VersionState.AVAILABLE
            )
            batching = version.settings.batching or self._batching
            max_batch = batching.max_batch_size if batching else 0
            signatures = {
                name: self._request_signature(version, signature)
                for name, signature in version.model.signatures.items()
            }
            return ModelMetadata(
                version.id, signatures, version.runtime, available, max_batch, version.settings.device
            )

    def ready(self) -> bool:
        """True when every configured model has a version serving."""
        return self._manager.ready()


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


def _batch_recorder(
    statistics: VersionStatistics, histogram: Histogram | None
) -> Callable[[int, float], None]:
    def record(rows: int, latency_s: float) -> None:
        statistics.executed(rows, latency_s)
        if histogram is not None:
            histogram.observe(rows)

    return record


def _find_signature(version: ServedVersion, name: str | None, method: Method | None) -> Signature:
    assert version.model is not None
    signatures = version.model.signatures
    if name is None:
        default = signatures.get(DEFAULT_SIGNATURE)
        if method is None or method is Method.PREDICT or (default and default.method is method):
            name = DEFAULT_SIGNATURE
        else:
            name = next((s.name for s in signatures.values() if s.method is method), None)
            if name is None:
                raise InvalidArgument(f"model {version.id} has no signature with method {method.value}")
    signature = signatures.get(name)
    if signature is None:
        raise InvalidArgument(
            f'Serving signature name: "{name}" not found in signature def; '
            f"model {version.id} has {sorted(signatures)}"
        )
    # TF2 signatures all record predict; TF Serving (its default, no method-name check) runs
    # Classify and Regress on them when their outputs have the method's names.
    if (
        method not in (None, Method.PREDICT)
        and signature.method is not method
        and not _fits(signature, method)
    ):
        raise InvalidArgument(
            f"signature {name!r} has method {signature.method.value}, expected {method.value}"
        )
    return signature


def _fits(signature: Signature, method: Method) -> bool:
    """A predict signature serves ``method`` when its outputs have TF Serving's names for it:
    ``classes`` and/or ``scores`` to classify, ``outputs`` to regress."""
    names = {spec.name for spec in signature.outputs}
    wanted = {"classes", "scores"} if method is Method.CLASSIFY else {"outputs"}
    return signature.method is Method.PREDICT and bool(names & wanted)


def conform_inputs(signature: Signature, inputs: Mapping[str, np.ndarray]) -> Tensors:
    """Check decoded inputs against ``signature`` and cast them to its dtypes.

    Raises:
        InvalidArgument: a missing or unexpected input, or one whose dtype kind or shape the
            signature cannot accept; the message names the input, the expected and the received.
    """
    expected = signature.input_names()
    missing = [name for name in expected if name not in inputs]
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        raise InvalidArgument(
            f"signature {signature.name!r} takes inputs {expected}; missing {missing}, unexpected {extra}"
        )
    check_shape = not signature.runtime_checks_shapes
    return {spec.name: conform(spec, inputs[spec.name], check_shape) for spec in signature.inputs}


def conform(spec: TensorSpec, value: np.ndarray, check_shape: bool = True) -> np.ndarray:
    """Check ``value``'s dtype kind and (with ``check_shape``) shape against ``spec``, then cast
    it to ``spec``'s dtype."""
    target = spec.dtype
    shape_fits = (
        not check_shape
        or spec.shape is None
        or (
            value.ndim == len(spec.shape)
            and all(d in (-1, n) for d, n in zip(spec.shape, value.shape, strict=True))
        )
    )
    if not shape_fits or value.dtype.kind not in _ACCEPTED_KINDS.get(target.kind, target.kind):
        raise InvalidArgument(f"input {spec.name!r}: expected {spec.describe()}, got {_describe(value)}")
    if value.dtype != target:
        if (problem := integer_range_error(spec.name, value, target)) is not None:
            raise InvalidArgument(problem)
        value = value.astype(target)
    if target.kind == "O" and not all(isinstance(item, str | bytes) for item in value.flat):
        raise InvalidArgument(f"input {spec.name!r}: expected strings ({spec.describe()}), got other values")
    return value


def _describe(value: np.ndarray) -> str:
    try:
        name = dtype_of(value.dtype).v2
    except KeyError:
        name = str(value.dtype)
    return f"{name} [{', '.join(map(str, value.shape))}]"


def _check_outputs(version: ServedVersion, signature: Signature, outputs: Mapping[str, object]) -> Tensors:
    missing = [spec.name for spec in signature.outputs if spec.name not in outputs]
    if missing:
        log.error("%s returned outputs %s, missing %s", version.id, sorted(outputs), missing)
        raise Internal(f"model {version.id} did not return output(s) {missing}")
    return {spec.name: np.asarray(outputs[spec.name]) for spec in signature.outputs}
