"""InferenceService: the one core that every protocol adapter calls.

It resolves the version a request asks for, checks the inputs against the signature (names,
dtypes, shapes), joins its features and looks in its prediction cache, runs it through the
version's ``Servable`` (batcher or inference thread) while holding a lease on the version, and
checks what the model returned. What lives as long as a version lives in ``servable.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType

import numpy as np

from inferd.errors import DEADLINE_PASSED, InferdError, Internal, InvalidArgument, NotFound
from inferd.manager import Lease, ModelManager, ServedVersion
from inferd.metrics import Metrics
from inferd.servable import Servable
from inferd.statistics import VersionStatistics
from inferd.tracing import Tracing
from inferd.types import (
    ACCEPTED_KINDS,
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
    float_range_error,
    integer_range_error,
    may_hold_infinity,
)

log = logging.getLogger(__name__)

_SERVER_FAILURES = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
"""Statuses of a failed request that are counted on the version that was computing it."""


class InferenceService:
    """Validate, predict, measure. Call from the event loop's thread.

    Args:
        manager: serves the versions; each one's ``Servable`` holds its batchers, feature join,
            prediction cache and in-flight bound.
        metrics: where each ``call`` is counted and timed; by default a collector of its own.
        traffic_key_header: the request header (gRPC metadata key) whose value keeps one client
            on one version of a traffic split (``--traffic_key_header``); lower case, "" for none.
    """

    def __init__(
        self,
        manager: ModelManager[Servable],
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        traffic_key_header: str = "",
    ) -> None:
        self._manager = manager
        self._metrics = metrics or Metrics()
        self._tracing = tracing
        self._ids = itertools.count(1)
        self.traffic_key_header = traffic_key_header.lower()
        self.answered: list[Callable[[Call], None]] = []
        """Called with each call that ended with an answer, after its lease was returned, on the
        event loop's thread (shadow, capture): each must return at once and never raise."""
        self.admitting: list[Callable[[Tensors], None]] = []
        """Called with each call's decoded inputs before they are computed, on the event loop's
        thread; each may refuse the call by raising an ``InferdError`` (the in-flight byte budget
        holds what decoded strings take)."""

    def request_id(self) -> str:
        """A new request id, unique in this process (``r1``, ``r2``, ...): the one scheme every
        protocol names its requests with in logs and error messages."""
        return f"r{next(self._ids)}"

    def call(
        self, protocol: str, model: str, request_id: str | None = None, traffic_key: str | None = None
    ) -> Call:
        """The handle of one inference request of ``protocol`` on model ``model`` (as the request
        named it); see ``Call``. ``request_id`` defaults to a new ``request_id()``; ``traffic_key``
        (the value of ``traffic_key_header``) chooses the version of a traffic split."""
        call = Call(self, protocol, model, request_id or self.request_id())
        call.traffic_key = traffic_key
        return call

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
            servable = _servable(version)
            return servable.request_signature(_find_signature(version, name, method))

    async def infer(self, ref: ModelRef, request: InferenceRequest) -> InferenceResponse:
        """Run one request on the version ``ref`` resolves to, batched when batching is on.

        Raises:
            InferdError: bad input (INVALID_ARGUMENT), unknown model (NOT_FOUND), a full queue
                (UNAVAILABLE), a passed deadline (DEADLINE_EXCEEDED), and INTERNAL when the model
                fails in a way the input did not cause (logged here).
        """
        started = time.perf_counter()
        with await self._manager.acquire(ref) as version:
            statistics = _servable(version).statistics
            try:
                signature = _find_signature(version, request.signature_name, None)
                response = await self._infer(version, signature, request)
            except BaseException:
                statistics.failed(time.perf_counter() - started)
                raise
            statistics.succeeded(time.perf_counter() - started, response.queue_s, response.predict_s)
            return response

    async def _infer(
        self, version: ServedVersion[Servable], signature: Signature, request: InferenceRequest
    ) -> InferenceResponse:
        """``infer`` on a leased version, for the model signature ``signature``."""
        servable = _servable(version)
        features_s = 0.0
        if servable.join is None:
            inputs = conform_inputs(signature, request.inputs)
        else:
            inputs = conform_inputs(servable.join.request_signature(signature), request.inputs)
            started = time.perf_counter()
            inputs = await servable.join.join(signature.name, inputs, request.deadline)
            features_s = time.perf_counter() - started
        predictions = servable.predictions
        if predictions is not None:
            key = predictions.key(signature.name, inputs)
            if (cached := predictions.get(key)) is not None:
                servable.prediction_counts.hits += 1
                return InferenceResponse(version.id, dict(cached), request.id, features_s=features_s)
            servable.prediction_counts.misses += 1
        try:
            outputs, queue_s, predict_s, batch_rows = await servable.run(
                signature.name, inputs, request.deadline
            )
        except InferdError:
            raise
        except Exception:
            log.exception("%s failed on request %s", version.id, request.id)
            raise Internal(
                f"model {version.id} failed while predicting request {request.id}; see the server log"
            ) from None
        checked = _check_outputs(version, signature, outputs, request.id)
        if predictions is not None:
            predictions.put(key, checked)
        self._manager.cold_answered(version)
        return InferenceResponse(version.id, checked, request.id, queue_s, predict_s, features_s, batch_rows)

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
                        found.append(_servable(served).statistics)
                except NotFound:
                    continue  # unloaded since the status was read
        return found

    def status(self, ref: ModelRef) -> list[VersionStatus]:
        """Version states of a model, highest version first (see ``ModelManager.status``)."""
        return self._manager.status(ref)

    def metadata(self, ref: ModelRef) -> ModelMetadata:
        """Signatures and runtime of the version ``ref`` resolves to."""
        with self._manager.lease(ref) as version:
            servable = _servable(version)
            available = tuple(
                s.version
                for s in self._manager.status(ModelRef(ref.name))
                if s.state is VersionState.AVAILABLE
            )
            max_batch = servable.batching.max_batch_size if servable.batching else 0
            signatures = {
                name: servable.request_signature(signature)
                for name, signature in servable.model.signatures.items()
            }
            return ModelMetadata(
                version.id, signatures, servable.runtime, available, max_batch, version.settings.device
            )

    def ready(self) -> bool:
        """True when every configured model has a version serving and no shutdown began."""
        return self._manager.ready()

    @property
    def draining(self) -> bool:
        """Whether the server is shutting down."""
        return self._manager.draining

    def _record(self, call: Call, status: str) -> None:
        """Count a finished call and, when it was answered, time its stages."""
        metrics = self._metrics
        if not call.model:
            return
        response = call.response
        if response is None:
            # the server's failure while computing counts on its version (a canary's guard reads
            # it); the client's (bad input) on none
            server_side = status in _SERVER_FAILURES and call.computing is not None
            version = str(call.computing) if server_side else ""
            model = call.model if self.knows(call.model) else ""
            metrics.count_request(model, version, call.protocol, status)
            if self._tracing is not None:
                ended = time.perf_counter()
                self._tracing.record(
                    call.protocol, call.model, version, status, call.id, 0, call.started, ended, None
                )
            return
        version = str(response.model_id.version)
        metrics.count_request(call.model, version, call.protocol, status)
        ended = time.perf_counter()
        if self._tracing is not None:
            first = next(iter(response.outputs.values()), None)
            rows = first.shape[0] if first is not None and first.ndim else 0
            stages = (call.decoded, response.features_s, response.queue_s, response.predict_s, call.resumed)
            self._tracing.record(
                call.protocol,
                call.model,
                version,
                status,
                call.id,
                rows,
                call.started,
                ended,
                stages,
                response.batch_rows,
            )
        # handoff: from decoded to resumed, what was neither features, queue nor predict: validation,
        # and the event loop's delay in taking the answer back from the predict thread.
        measured = response.features_s + response.queue_s + response.predict_s
        metrics.timer(call.model, version, call.protocol).observe(
            call.decoded - call.started,
            response.features_s,
            response.queue_s,
            response.predict_s,
            max(0.0, call.resumed - call.decoded - measured),
            ended - call.resumed,
            ended - call.started,
        )


class Call:
    """One inference request, from its first byte until its answer is encoded; a context manager.

    ``open`` takes the one lease the request holds on the version its ``ModelRef`` resolves to
    (until the call ends, so decoding and computing see the same version) and gives the request
    signature to decode against; ``infer`` runs the decoded inputs. When the ``with`` block ends,
    the lease is returned, and the request is counted by protocol, model, version and status (its
    gRPC code name: ``OK``, an ``InferdError``'s code, ``INTERNAL`` for anything else) and timed
    by stage (decode, features, queue, predict, handoff, encode, total) the same way for every
    protocol. A cancelled call is not counted. Event loop thread only.

    Attributes:
        id: the request id, for logs and error messages.
        protocol: the ``protocol`` label: ``tfserving_rest``, ``tfserving_grpc``, ``v2_rest`` or
            ``v2_grpc``.
        model: the model name as the request gave it ("" counts nothing).
    """

    __slots__ = (
        "_leases",
        "_service",
        "_signature",
        "_version",
        "computing",
        "deadline",
        "decoded",
        "ended",
        "id",
        "inputs",
        "model",
        "protocol",
        "response",
        "resumed",
        "started",
        "traffic_key",
    )

    def __init__(self, service: InferenceService, protocol: str, model: str, request_id: str) -> None:
        self._service = service
        self.protocol = protocol
        self.model = model
        self.id = request_id
        self.started = time.perf_counter()
        self.decoded = self.resumed = self.started
        self.response: InferenceResponse | None = None
        self._leases: dict[ModelRef, tuple[Lease[Servable], ServedVersion[Servable]]] = {}
        self._version: ServedVersion[Servable] | None = None
        self._signature: Signature | None = None
        self.traffic_key: str | None = None
        self.inputs: Tensors = {}
        self.ended = self.started
        self.computing: int | None = None
        """The version ``infer`` ran on, from its start (also when it failed)."""
        self.deadline: float | None = None
        """The deadline ``infer`` was given (``time.monotonic()``), if any."""

    @property
    def signature_name(self) -> str:
        """The model signature ``open`` chose last (``serving_default`` before it)."""
        return DEFAULT_SIGNATURE if self._signature is None else self._signature.name

    @property
    def answered_by(self) -> int | None:
        """The version number that answered, once ``infer`` returned; else None."""
        return None if self.response is None else self.response.model_id.version

    def __enter__(self) -> Call:
        self._service._metrics.in_flight += 1
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        leases, self._leases = list(self._leases.values()), {}
        for lease, _ in leases:
            lease.__exit__(None, None, None)
        self._service._metrics.in_flight -= 1
        self.ended = time.perf_counter()
        if error is None:
            self._service._record(self, "OK")
            if self.response is not None:
                for answered in self._service.answered:
                    answered(self)
        elif isinstance(error, InferdError):
            self._service._record(self, error.code.grpc_code)
        elif isinstance(error, Exception):
            self._service._record(self, "INTERNAL")
        elif isinstance(error, asyncio.CancelledError):  # counted too: a version that never answers shows
            passed = self.deadline is not None and time.monotonic() >= self.deadline
            late = passed or DEADLINE_PASSED in error.args
            self._service._record(self, "DEADLINE_EXCEEDED" if late else "CANCELLED")

    async def load(self, ref: ModelRef) -> None:
        """Take the lease ``open`` uses on the version ``ref`` resolves to, waiting for its load
        when it is cold (under a memory budget), at most ``--load_wait_ms``.

        Raises:
            NotFound: unknown model, version or label, or its load failed.
            Unavailable: the load takes longer than the wait (it goes on), or shutting down.
        """
        if ref not in self._leases:
            lease = await self._service._manager.acquire(ref, key=self.traffic_key)
            self._leases[ref] = (lease, lease.__enter__())

    def open(
        self, ref: ModelRef, name: str | None = None, method: Method | None = Method.PREDICT
    ) -> Signature:
        """Lease the version ``ref`` resolves to (once per ref and call) and choose the signature
        ``name`` (or the default one for ``method``, see ``InferenceService.signature``).

        Returns:
            What the caller sends for that signature (the request side of a feature join).

        Raises:
            NotFound: unknown model, version or label.
            Unavailable: the server is shutting down.
            InvalidArgument: unknown signature, or one whose method is not ``method``.
        """
        self._version = version = self._lease(ref)
        self._signature = signature = _find_signature(version, name, method)
        return _servable(version).request_signature(signature)

    def signatures(self, ref: ModelRef) -> dict[str, Signature]:
        """What the caller sends for each signature of the version ``ref`` resolves to, by name:
        the version ``open`` will lease for the same ``ref`` (also in a traffic split).

        Raises:
            NotFound: unknown model, version or label.
            Unavailable: the server is shutting down.
        """
        servable = _servable(self._lease(ref))
        return {name: servable.request_signature(s) for name, s in servable.model.signatures.items()}

    def _lease(self, ref: ModelRef) -> ServedVersion[Servable]:
        """The version ``ref`` resolves to, leased once per ref and call (by the traffic key)."""
        held = self._leases.get(ref)
        if held is None:
            lease = self._service._manager.lease(ref, self.traffic_key)
            held = self._leases[ref] = (lease, lease.__enter__())
        return held[1]

    async def infer(
        self, inputs: Tensors, deadline: float | None = None, request_id: str | None = None
    ) -> InferenceResponse:
        """Run decoded ``inputs`` on the signature ``open`` chose; ``request_id`` (the client's
        own id, for V2) names it in logs instead of ``id``.

        Raises:
            InferdError: as ``InferenceService.infer``.
        """
        version, signature = self._version, self._signature
        assert version is not None, "open the call first"
        assert signature is not None
        self.decoded = time.perf_counter()
        for admit in self._service.admitting:
            admit(inputs)
        self.inputs = inputs
        self.computing = version.id.version
        self.deadline = deadline
        request = InferenceRequest(inputs, signature.name, request_id or self.id, deadline=deadline)
        statistics = _servable(version).statistics
        try:
            response = await self._service._infer(version, signature, request)
        except BaseException:
            statistics.failed(time.perf_counter() - self.decoded)
            raise
        statistics.succeeded(time.perf_counter() - self.decoded, response.queue_s, response.predict_s)
        self.resumed = time.perf_counter()
        self.response = response
        return response


def _servable(version: ServedVersion[Servable]) -> Servable:
    """The servable of a leased version (set from AVAILABLE until the last lease is returned)."""
    assert version.servable is not None
    return version.servable


def _find_signature(version: ServedVersion[Servable], name: str | None, method: Method | None) -> Signature:
    signatures = _servable(version).model.signatures
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
    shape_fits = not check_shape or spec.shape is None or _shape_fits(spec.shape, value.shape)
    if not shape_fits or value.dtype.kind not in ACCEPTED_KINDS.get(target.kind, target.kind):
        raise InvalidArgument(f"input {spec.name!r}: expected {spec.describe()}, got {_describe(value)}")
    if value.dtype != target:
        if (problem := integer_range_error(spec.name, value, target)) is not None:
            raise InvalidArgument(problem)
        # a tensor of another declared dtype: an overflow is refused just below, with its value
        # (JSON numbers arrive in the input's float dtype, an infinity where the peers make one)
        cast = value.astype(target)
        if may_hold_infinity(cast) and (problem := float_range_error(spec.name, value, cast)):
            raise InvalidArgument(problem)
        value = cast
    if target.kind == "O" and not all(isinstance(item, str | bytes) for item in value.flat):
        raise InvalidArgument(f"input {spec.name!r}: expected strings ({spec.describe()}), got other values")
    return value


def _shape_fits(declared: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """``shape`` has ``declared``'s rank and its size wherever one is declared (not -1). The usual
    case, a free batch dimension and fixed others, is decided by tuple comparisons alone."""
    if len(declared) != len(shape):
        return False
    if not declared or (declared[0] in (-1, shape[0]) and declared[1:] == shape[1:]):
        return True
    return all(d in (-1, n) for d, n in zip(declared, shape, strict=True))


def _describe(value: np.ndarray) -> str:
    try:
        name = dtype_of(value.dtype).v2
    except KeyError:
        name = str(value.dtype)
    return f"{name} [{', '.join(map(str, value.shape))}]"


def _check_outputs(
    version: ServedVersion[Servable],
    signature: Signature,
    outputs: Mapping[str, object],
    request_id: str | None,
) -> Tensors:
    missing = [spec.name for spec in signature.outputs if spec.name not in outputs]
    if missing:
        log.error(
            "%s returned outputs %s on request %s, missing %s",
            version.id,
            sorted(outputs),
            request_id,
            missing,
        )
        raise Internal(f"model {version.id} did not return output(s) {missing} on request {request_id}")
    return {spec.name: _native(np.asarray(outputs[spec.name])) for spec in signature.outputs}


def _native(array: np.ndarray) -> np.ndarray:
    """``array`` in the machine's byte order, which the encoders take (a model may return
    big-endian values: ``>f4``)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
