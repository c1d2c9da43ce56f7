"""InferenceService: the one core that every protocol adapter calls.

It resolves the version a request asks for, checks the inputs against the signature (names,
dtypes, shapes), runs the model on the inference thread pool while holding a lease on the
version, and checks what the model returned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import Executor

import numpy as np

from inferd.errors import InferdError, Internal, InvalidArgument
from inferd.manager import ModelManager, ServedVersion
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
    VersionStatus,
    dtype_of,
)

log = logging.getLogger(__name__)

_ACCEPTED_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b", "O": "OUS"}
"""Signature dtype kind -> kinds of decoded values it accepts (ints are accepted as floats)."""


class InferenceService:
    """Validate, predict, measure. Call from the event loop's thread."""

    def __init__(self, manager: ModelManager, executor: Executor) -> None:
        self._manager = manager
        self._executor = executor

    def signature(self, ref: ModelRef, name: str | None, method: Method = Method.PREDICT) -> Signature:
        """The signature a request names, or the default one for ``method``.

        With no name, PREDICT takes ``serving_default``; CLASSIFY and REGRESS take
        ``serving_default`` when it has that method, else the first signature that has it.

        Raises:
            NotFound: unknown model, version or label.
            InvalidArgument: unknown signature, or one whose method is not ``method``.
        """
        with self._manager.lease(ref) as version:
            return _find_signature(version, name, method)

    async def infer(self, ref: ModelRef, request: InferenceRequest) -> InferenceResponse:
        """Run one request on the version ``ref`` resolves to.

        Raises:
            InferdError: bad input (INVALID_ARGUMENT), unknown model (NOT_FOUND), and INTERNAL
                when the model fails in a way the input did not cause (logged here).
        """
        with self._manager.lease(ref) as version:
            signature = _find_signature(version, request.signature_name, None)
            inputs = conform_inputs(signature, request.inputs)
            model = version.model
            assert model is not None
            try:
                outputs = await asyncio.get_running_loop().run_in_executor(
                    self._executor, model.predict, signature.name, inputs
                )
            except InferdError:
                raise
            except Exception:
                log.exception("%s failed on request %s", version.id, request.id)
                raise Internal(f"model {version.id} failed while predicting; see the server log") from None
            return InferenceResponse(version.id, _check_outputs(version, signature, outputs), request.id)

    def status(self, ref: ModelRef) -> list[VersionStatus]:
        """Version states of a model, highest version first (see ``ModelManager.status``)."""
        return self._manager.status(ref)

    def metadata(self, ref: ModelRef) -> ModelMetadata:
        """Signatures and runtime of the version ``ref`` resolves to."""
        with self._manager.lease(ref) as version:
            assert version.model is not None
            return ModelMetadata(version.id, dict(version.model.signatures), version.runtime)

    def ready(self) -> bool:
        """True when every configured model has a version serving."""
        return self._manager.ready()


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
    if method is not None and method is not Method.PREDICT and signature.method is not method:
        raise InvalidArgument(
            f"signature {name!r} has method {signature.method.value}, expected {method.value}"
        )
    return signature


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
    return {spec.name: conform(spec, inputs[spec.name]) for spec in signature.inputs}


def conform(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    """Check ``value``'s shape and dtype kind against ``spec``, then cast it to ``spec``'s dtype."""
    target = spec.dtype
    shape_fits = spec.shape is None or (
        value.ndim == len(spec.shape)
        and all(d in (-1, n) for d, n in zip(spec.shape, value.shape, strict=True))
    )
    if not shape_fits or value.dtype.kind not in _ACCEPTED_KINDS.get(target.kind, target.kind):
        raise InvalidArgument(f"input {spec.name!r}: expected {spec.describe()}, got {_describe(value)}")
    if value.dtype != target:
        if target.kind in "iu" and value.size:
            info = np.iinfo(target)
            if value.min() < info.min or value.max() > info.max:
                raise InvalidArgument(
                    f"input {spec.name!r}: values must lie in [{info.min}, {info.max}] for "
                    f"{dtype_of(target).v2}, got [{value.min()}, {value.max()}]"
                )
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
