"""TensorFlow Serving's REST API (``/v1/...``): decode JSON, call the service, encode JSON.

Follows TF Serving's routes, request formats (row ``instances`` and columnar ``inputs``),
response shapes (``predictions`` / ``outputs`` / ``results``) and status codes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np
import orjson

from inferd.errors import InferdError, InvalidArgument, encodable
from inferd.protocols.decoding import decode
from inferd.protocols.limits import RequestLimits
from inferd.protocols.rest_status import JSON_HEADERS, Response, json_error, model_ref, with_version
from inferd.service import Call, InferenceService
from inferd.types import (
    Method,
    ModelMetadata,
    ModelRef,
    Signature,
    Tensors,
    TensorSpec,
    VersionStatus,
    dtype_of,
)

PROTOCOL = "tfserving_rest"

_POST = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)",
    re.IGNORECASE,
)
_GET = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(/metadata)?", re.IGNORECASE)
_JSON = JSON_HEADERS
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_METHODS = {"predict": Method.PREDICT, "classify": Method.CLASSIFY, "regress": Method.REGRESS}


async def handle(
    service: InferenceService,
    method: str,
    path: str,
    body: bytes,
    request_id: str,
    limits: RequestLimits,
    deadline: float | None = None,
    traffic_key: str | None = None,
    decode_pool: Executor | None = None,
) -> Response:
    """Answer one request under ``/v1/``. Expected failures become error responses; an inference
    request is counted and timed by its ``service.call``, and its answer names the version that
    answered in the ``X-Inferd-Model-Version`` header.

    ``deadline`` (``time.monotonic()``) is passed on so that queued work past it is dropped;
    ``traffic_key`` (the ``--traffic_key_header`` value) chooses the version of a traffic split;
    large bodies are decoded on ``decode_pool`` (see ``decoding``).
    """
    try:
        if method == "POST" and (match := _POST.fullmatch(path)):
            name, version, label, verb = match.groups()
            with service.call(PROTOCOL, name, request_id, traffic_key) as call:
                ref = model_ref(name, version, label)
                doc = await decode(decode_pool, len(body), parse_json, body)
                offload = (decode_pool, len(body))
                if verb.lower() == "predict":
                    answer = await _predict(call, ref, doc, deadline, limits, offload)
                else:
                    method_ = _METHODS[verb.lower()]
                    answer = await _classify_or_regress(call, ref, method_, doc, deadline, limits, offload)
                return with_version(answer, call.answered_by)
        elif method == "GET" and (match := _GET.fullmatch(path)):
            name, version, label, metadata = match.groups()
            if name is None:
                raise InvalidArgument("Missing model name in request.")
            ref = model_ref(name, version, label)
            document = _metadata(service.metadata(ref)) if metadata else _status(service.status(ref))
            return 200, _JSON, orjson.dumps(document)
        else:
            expected = "POST .../NAME:predict|classify|regress or GET .../NAME[/metadata]"
            raise InvalidArgument(f"Malformed request: {method} {path}; expected {expected}")
    except InferdError as error:
        return json_error(error)


def parse_json(body: bytes) -> dict[str, Any]:
    """A request body -> its JSON object; NaN and Infinity are read as TF Serving reads them.

    Raises:
        InvalidArgument: empty, not JSON, not an object, or a non-string ``signature_name``.
    """
    if not body.strip():
        raise InvalidArgument("JSON Parse error: The document is empty")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:  # the standard parser also takes NaN, Infinity and -Infinity, as TF Serving does
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidArgument(f"JSON Parse error: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgument(
            f"JSON Value: the request body must be an object, got {type(document).__name__}"
        )
    if "signature_name" in document and not isinstance(document["signature_name"], str):
        raise InvalidArgument("'signature_name' key must be a string value.")
    return document


async def _predict(
    call: Call,
    ref: ModelRef,
    doc: dict[str, Any],
    deadline: float | None,
    limits: RequestLimits,
    offload: tuple[Executor | None, int] = (None, 0),
) -> Response:
    signature = call.open(ref, doc.get("signature_name"))
    if ("instances" in doc) == ("inputs" in doc):
        raise InvalidArgument(
            "expecting only one of 'inputs' or 'instances' keys to exist"
            if "inputs" in doc
            else "Missing 'inputs' or 'instances' key"
        )
    row_format = "instances" in doc
    decoder = TensorDecoder(limits)
    key = "instances" if row_format else "inputs"
    inputs = await decode(*offload, _take_tensors, decoder, signature, doc, key)
    response = await call.infer(inputs, deadline)
    outputs = {name: _jsonable(name, value) for name, value in response.outputs.items()}
    if not row_format:
        (only,) = outputs.values() if len(outputs) == 1 else (outputs,)
        return _encode({"outputs": only}, response.outputs)
    return _encode({"predictions": _per_row(outputs)}, response.outputs)


def _take_tensors(decoder: TensorDecoder, signature: Signature, doc: dict[str, Any], key: str) -> Tensors:
    """Decode ``doc[key]`` (``instances`` or ``inputs``), taking it out of ``doc``: its JSON values
    are then freed where this runs (on the decode thread for a large body), not on the event loop."""
    value = doc.pop(key)
    return decoder.rows(signature, value) if key == "instances" else decoder.columns(signature, value)


class TensorDecoder:
    """TF Serving's JSON tensor values -> ndarrays, within ``limits``.

    Every method raises InvalidArgument (malformed or not fitting the signature) or
    ResourceExhausted (over a limit), naming the input.
    """

    def __init__(self, limits: RequestLimits) -> None:
        self._limits = limits

    def rows(self, signature: Signature, instances: Any) -> Tensors:
        """The row format: ``instances``, a list of values or of objects keyed by input name."""
        if not isinstance(instances, list):
            raise InvalidArgument("Expecting 'instances' to be an list/array")
        if not instances:
            raise InvalidArgument("No values in 'instances' array")
        self._limits.instances("instances", len(instances))
        names = signature.input_names()
        named = [isinstance(item, dict) and not _is_b64(item) for item in instances]
        if all(named):
            for i, item in enumerate(instances):
                if set(item) != set(names):
                    raise InvalidArgument(
                        f"instances[{i}] has keys {sorted(item)}; "
                        f"the keys must be equal to: {','.join(names)}"
                    )
            return {name: self.array([item[name] for item in instances], name) for name in names}
        if any(named):
            raise InvalidArgument(
                "'instances' mixes named-input objects with plain values; use one form throughout"
            )
        if len(names) != 1:
            raise InvalidArgument(
                "instances is a plain list, but expecting list of objects as multiple input tensors "
                f"required as per tensorinfo_map: {','.join(names)}"
            )
        return {names[0]: self.array(instances, names[0])}

    def columns(self, signature: Signature, inputs: Any) -> Tensors:
        """The columnar format: ``inputs``, one value or an object keyed by input name."""
        names = signature.input_names()
        if isinstance(inputs, dict) and not _is_b64(inputs):
            for name in names:
                if name not in inputs:
                    raise InvalidArgument(f"Missing named input: {name} in 'inputs' object.")
            return {name: self.array(inputs[name], name) for name in names}
        if len(names) != 1:
            raise InvalidArgument(f"'inputs' must be an object with the keys {','.join(names)}")
        return {names[0]: self.array(inputs, names[0])}

    def examples(self, signature: Signature, examples: list[Any], context: dict[str, Any]) -> Tensors:
        """Examples (objects of features) -> input tensors. Features are matched to inputs by
        name; with a one-input signature, a one-feature example gives that input whatever its name."""
        self._limits.instances("examples", len(examples))
        names = signature.input_names()
        rows = []
        for i, example in enumerate(examples):
            if not isinstance(example, dict):
                raise InvalidArgument(f"examples[{i}] must be an object of features")
            if clash := set(example) & set(context):
                raise InvalidArgument(f"examples[{i}] repeats context feature(s) {sorted(clash)}")
            features = {**context, **example}
            if set(features) == set(names):
                rows.append(features)
            elif len(names) == 1 and len(features) == 1:
                rows.append({names[0]: next(iter(features.values()))})
            else:
                raise InvalidArgument(f"examples[{i}] has features {sorted(features)}; expected {names}")
        return {name: self.array([row[name] for row in rows], name) for name in names}

    def array(self, value: Any, name: str) -> np.ndarray:
        """Nested JSON lists -> an ndarray; ``{"b64": ...}`` leaves become bytes."""
        try:
            array = np.asarray(value)
        except (ValueError, OverflowError):
            array = None  # ragged, too deep for numpy, or an integer past 64 bits: walked below
        if array is None or array.dtype.kind == "O":
            decoded = self._objects(value, name, 0)
            try:
                array = np.array(decoded, dtype=object)
            except ValueError:
                raise InvalidArgument(f"input {name!r}: the nested lists are ragged") from None
            if array.dtype.kind == "O" and any(isinstance(leaf, list) for leaf in array.flat):
                raise InvalidArgument(
                    f"input {name!r}: the nested lists are ragged; every list at one depth must have "
                    "the same length"
                )
            if not all(isinstance(leaf, str | bytes) for leaf in array.flat):
                raise InvalidArgument(
                    f"input {name!r}: values of different JSON types (e.g. numbers and strings) in one tensor"
                )
        self._limits.depth(name, array.ndim)
        self._limits.elements(name, array.shape)
        self._limits.text(name, array)
        return array

    def _objects(self, value: Any, name: str, depth: int) -> Any:
        """Walk a value numpy could not type: check depth, string sizes and leaves; decode b64."""
        if isinstance(value, list):
            self._limits.depth(name, depth + 1)
            return [self._objects(item, name, depth + 1) for item in value]
        if isinstance(value, dict):
            if not _is_b64(value) or not isinstance(value["b64"], str):
                raise InvalidArgument(f'input {name!r}: objects are only allowed as {{"b64": "<base64>"}}')
            self._limits.string(name, len(value["b64"]) * 3 // 4)
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument(f"input {name!r}: Unable to base64 decode") from None
        if value is None:
            raise InvalidArgument(f"input {name!r}: null is not a tensor value")
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
            raise InvalidArgument(f"input {name!r}: integer {value} does not fit in 64 bits")
        if isinstance(value, str) and len(value) * 4 > self._limits.max_string_bytes:
            self._limits.string(name, len(value.encode()))  # UTF-8 takes up to 4 bytes a character
        return value  # a string, number or boolean; array() refuses a mix of them


def _is_b64(value: Mapping[str, Any]) -> bool:
    return len(value) == 1 and "b64" in value


def _jsonable(name: str, value: np.ndarray) -> np.ndarray | list[Any]:
    """An output ready for JSON: numeric arrays stay arrays; strings become str or b64 objects."""
    if value.dtype.kind in "OUS":
        as_b64 = name.endswith("_bytes")
        strings = np.frompyfunc(lambda item: _string(item, as_b64), 1, 1)(value)
        return np.asarray(strings, dtype=object).tolist()  # type: ignore[no-any-return]
    # The canonical native dtype (a view, no copy, where only the type differs): onnxruntime
    # returns int64 as numpy.longlong, whose scalars (rows of a 1-D output) orjson cannot write.
    return np.ascontiguousarray(value, dtype=np.dtype(value.dtype.str).newbyteorder("="))


def _string(item: Any, as_b64: bool) -> Any:
    if isinstance(item, bytes):
        if as_b64:
            return {"b64": base64.b64encode(item).decode()}
        try:
            return item.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(item).decode()}
    return encodable(item if isinstance(item, str) else str(item))  # a lone surrogate has no UTF-8


def _per_row(outputs: dict[str, Any]) -> Any:
    if len(outputs) == 1:
        (only,) = outputs.values()
        if isinstance(only, np.ndarray) and only.ndim == 0:
            raise InvalidArgument(
                "Tensor has no shape information: a row-format response needs outputs of rank >= 1"
            )
        return only
    sizes = {
        name: len(value) if not np.isscalar(value) and np.ndim(value) else None
        for name, value in outputs.items()
    }
    batch = set(sizes.values())
    if len(batch) != 1 or None in batch:
        raise InvalidArgument(
            f"outputs have inconsistent batch sizes {sizes}; use the columnar 'inputs' format"
        )
    (n,) = batch
    assert n is not None
    return [{name: value[i] for name, value in outputs.items()} for i in range(n)]


def _encode(document: dict[str, Any], outputs: Tensors) -> Response:
    """JSON for ``document``, which holds ``outputs``. orjson writes NaN as null, so a document
    with a non-finite float goes through the standard library, which writes NaN and Infinity
    tokens as TF Serving does."""
    if all(value.dtype.kind != "f" or np.isfinite(value).all() for value in outputs.values()):
        return 200, _JSON, orjson.dumps(document, option=_NUMPY)
    return 200, _JSON, json.dumps(document, default=lambda a: a.tolist()).encode()


async def _classify_or_regress(
    call: Call,
    ref: ModelRef,
    method: Method,
    doc: dict[str, Any],
    deadline: float | None,
    limits: RequestLimits,
    offload: tuple[Executor | None, int] = (None, 0),
) -> Response:
    verb = "classify" if method is Method.CLASSIFY else "regress"
    examples = doc.get("examples")
    if examples is None:
        raise InvalidArgument(f"When method is {verb}, key 'examples' is expected and was not found")
    if not isinstance(examples, list) or not examples:
        raise InvalidArgument("'examples' value must be a non-empty array")
    context = doc.get("context", {})
    if not isinstance(context, dict):
        raise InvalidArgument("'context' must be an object of features")
    signature = call.open(ref, doc.get("signature_name"), method)
    inputs = await decode(*offload, TensorDecoder(limits).examples, signature, examples, context)
    response = await call.infer(inputs, deadline)
    if method is Method.REGRESS:
        ((name, values),) = response.outputs.items()
        if values.shape not in ((len(examples),), (len(examples), 1)):
            raise InvalidArgument(
                "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                f"{list(values.shape)}; use :predict for a model with several outputs per example"
            )
        return _encode({"results": _jsonable(name, values.reshape(len(examples)))}, response.outputs)
    classes, scores = response.outputs["classes"], response.outputs["scores"]
    labels = _jsonable("classes", classes)
    results = [
        [[str(c), s] for c, s in zip(row, srow, strict=True)]
        for row, srow in zip(labels, scores.tolist(), strict=True)
    ]
    return _encode({"results": results}, response.outputs)


def _status(statuses: list[VersionStatus]) -> dict[str, Any]:
    return {
        "model_version_status": [
            {
                "version": str(s.version),
                "state": s.state.name,
                "status": {"error_code": s.error_code, "error_message": s.error_message},
            }
            for s in statuses
        ]
    }


def _metadata(meta: ModelMetadata) -> dict[str, Any]:
    def tensor(spec: TensorSpec) -> dict[str, Any]:
        shape = (
            {"dim": [], "unknown_rank": True}
            if spec.shape is None
            else {"dim": [{"size": str(d), "name": ""} for d in spec.shape], "unknown_rank": False}
        )
        return {"dtype": dtype_of(spec.dtype).tf, "tensor_shape": shape, "name": spec.name}

    signatures = {
        name: {
            "inputs": {spec.name: tensor(spec) for spec in sig.inputs},
            "outputs": {spec.name: tensor(spec) for spec in sig.outputs},
            "method_name": sig.method.value,
            "defaults": {},
        }
        for name, sig in meta.signatures.items()
    }
    return {
        "model_spec": {
            "name": meta.model_id.name,
            "signature_name": "",
            "version": str(meta.model_id.version),
        },
        "metadata": {"signature_def": {"signature_def": signatures}},
        "device": meta.device,
    }
