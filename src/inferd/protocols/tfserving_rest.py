"""TensorFlow Serving's REST API (``/v1/...``): decode JSON, call the service, encode JSON.

Follows TF Serving's routes, request formats (row ``instances`` and columnar ``inputs``),
response shapes (``predictions`` / ``outputs`` / ``results``) and status codes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from inferd._proto.example_pb2 import Example, Feature
from inferd.errors import (
    InferdError,
    InvalidArgument,
    NotFound,
    Unavailable,
    UnknownLabel,
    encodable,
)
from inferd.protocols.codecs import (
    TEXT_ARRAY_BYTES,
    all_text,
    first_boolean,
    may_hold_booleans,
    may_hold_text,
    text_swells,
)
from inferd.protocols.decoding import BodyDecoder, decode
from inferd.protocols.limits import RequestLimits
from inferd.protocols.rest_status import JSON_HEADERS, Response, json_error, model_ref, with_version
from inferd.service import Call, InferenceService
from inferd.types import (
    DEFAULT_SIGNATURE,
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
    decode_pool: BodyDecoder | None = None,
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
            with service.call(PROTOCOL, name, request_id, traffic_key) as call, unknown_label_as_invalid():
                ref = model_ref(name, version, label)
                offload = (decode_pool, len(body))
                predict = verb.lower() == "predict"
                if predict and decode_pool is not None and decode_pool.in_process(len(body)):
                    doc, decoded = await decode_pool.apart(
                        _parse_predict, body, limits, _signatures(call, ref)
                    )
                    answer = await _predict(call, ref, doc, deadline, limits, offload, decoded)
                else:
                    doc = await decode(decode_pool, len(body), parse_json, body)
                    if predict:
                        booleans, texts = may_hold_booleans(body, len(body)), may_hold_text(body, doc)
                        answer = await _predict(
                            call, ref, doc, deadline, limits, offload, None, booleans, texts
                        )
                    else:
                        method_ = _METHODS[verb.lower()]
                        answer = await _classify_or_regress(
                            call, ref, method_, doc, deadline, limits, offload
                        )
                return with_version(answer, call.answered_by)
        elif method == "GET" and (match := _GET.fullmatch(path)):
            name, version, label, metadata = match.groups()
            if name is None:
                raise InvalidArgument("Missing model name in request.")
            if metadata:
                document = _metadata(service.metadata(model_ref(name, version, label)))
            else:  # TF Serving's GetModelStatus reads no label: every version, even for an unknown one
                document = _status(service.status(model_ref(name, version)))
            return 200, _JSON, orjson.dumps(document)
        else:
            expected = "POST .../NAME:predict|classify|regress or GET .../NAME[/metadata]"
            raise InvalidArgument(f"Malformed request: {method} {path}; expected {expected}")
    except InferdError as error:
        if isinstance(error, UnknownLabel):
            error = InvalidArgument(error.message)  # TF Serving's v1 answers an unknown label with 400
        return json_error(error)


class _UnknownLabelAsInvalid:
    """See ``unknown_label_as_invalid`` (a class: a generator context manager costs more, per
    request)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        if isinstance(error, UnknownLabel):
            raise InvalidArgument(error.message) from None


def unknown_label_as_invalid() -> _UnknownLabelAsInvalid:
    """TF Serving's APIs answer an unknown version label with INVALID_ARGUMENT (the V2 API,
    NOT_FOUND); inside a ``service.call`` it is also counted so."""
    return _LABEL_AS_INVALID


_LABEL_AS_INVALID = _UnknownLabelAsInvalid()


_PARSE_ERRORS = (
    ("Expecting value", "Invalid value."),
    ("Expecting property name", "Missing a name for object member."),
    ("Expecting ':' delimiter", "Missing a colon after a name of object member."),
    (
        "Expecting ',' delimiter",
        "Missing a comma or ']' after an array element, or '}' after an object member.",
    ),
    ("Extra data", "The document root must not be followed by other values."),
    ("Unterminated string", "Missing a closing quotation mark in string."),
    ("Invalid \\escape", "Invalid escape character in string."),
    ("Invalid control character", "Invalid encoding in string."),
)
"""The standard parser's messages -> rapidjson's, which TF Serving answers."""


class _NumberTooBig(ValueError):
    """A JSON number past float64's range (``1e400``), which rapidjson, and so TF Serving, refuses."""


def _double(text: str) -> float:
    """A JSON number with a fraction or exponent -> float, as rapidjson reads it.

    Raises:
        _NumberTooBig: past float64's range, where Python's float() would make it an infinity.
    """
    value = float(text)
    if math.isinf(value):
        raise _NumberTooBig(text[:40])
    return value


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
            document = json.loads(body, parse_float=_double)
        except _NumberTooBig as error:  # rapidjson's words, which TF Serving answers
            raise InvalidArgument(
                f"JSON Parse error: Number too big to be stored in double: {error}"
            ) from None
        except json.JSONDecodeError as error:
            # TF Serving's (rapidjson's) words first, which clients match; then where it went wrong.
            words = next((w for key, w in _PARSE_ERRORS if error.msg.startswith(key)), error.msg)
            raise InvalidArgument(
                f"JSON Parse error: {words} at line {error.lineno} column {error.colno}"
            ) from None
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
    offload: tuple[BodyDecoder | None, int] = (None, 0),
    decoded: Decoded | None = None,
    booleans: bool = True,
    texts: bool = True,
) -> Response:
    """``decoded``: what ``_parse_predict`` made of the body in a decode process, when it did;
    ``booleans``, ``texts``: whether the body may hold JSON booleans, strings (``TensorDecoder``)."""
    await call.load(ref)
    signature = call.open(ref, doc.get("signature_name") or None)  # "": the default, as in TF Serving
    if ("instances" in doc) == ("inputs" in doc):
        raise InvalidArgument(
            "expecting only one of 'inputs' or 'instances' keys to exist"
            if "inputs" in doc
            else "Missing 'inputs' or 'instances' key"
        )
    row_format = "instances" in doc
    decoder = TensorDecoder(limits, booleans, texts, offload[1])
    key = "instances" if row_format else "inputs"
    if decoded is None:
        inputs = await decode(*offload, _take_tensors, decoder, signature, doc, key)
    else:
        used, outcome = decoded
        if outcome is None or used != signature:  # the version changed since _signatures
            raise Unavailable("the model version changed while the request body was decoded; retry")
        if isinstance(outcome, InferdError):
            raise outcome
        inputs = outcome
    _check_json_types(signature, inputs)
    response = await call.infer(inputs, deadline)
    outputs = {name: _jsonable(name, value) for name, value in response.outputs.items()}
    if not row_format:
        (only,) = outputs.values() if len(outputs) == 1 else (outputs,)
        return _encode({"outputs": only}, response.outputs)
    return _encode({"predictions": _per_row(outputs)}, response.outputs)


Decoded = tuple[Signature | None, Tensors | InferdError | None]
"""A predict body's tensors decoded in a decode process, with the signature they were decoded
for, or the error decoding them raised; ``(None, None)`` when the body's signature or keys are
not usable (``_predict`` then raises the error a body decoded here would get)."""


def _signatures(call: Call, ref: ModelRef) -> dict[str, Signature]:
    """The signatures of the version the call leases for ``ref`` (the one it will run on, also in
    a traffic split), by name; none for an unknown model, whose NotFound is raised after the body
    is parsed, as for a body decoded here."""
    try:
        return call.signatures(ref)
    except NotFound:
        return {}


def _parse_predict(
    body: bytes, limits: RequestLimits, signatures: dict[str, Signature]
) -> tuple[dict[str, Any], Decoded]:
    """A predict body parsed and its tensors decoded for the signature it names, in a decode
    process: the document comes back without its (large) ``instances`` or ``inputs`` value.

    Raises:
        InvalidArgument: as ``parse_json``. Errors decoding the tensors are returned, not raised,
            so that ``_predict`` raises them only after the checks that come first.
    """
    doc = parse_json(body)
    signature = signatures.get(doc.get("signature_name") or DEFAULT_SIGNATURE)
    if signature is None or ("instances" in doc) == ("inputs" in doc):
        for key in ("instances", "inputs"):
            if key in doc:
                doc[key] = None
        return doc, (None, None)
    key = "instances" if "instances" in doc else "inputs"
    try:
        texts = may_hold_text(body, doc)
        decoder = TensorDecoder(limits, may_hold_booleans(body, len(body)), texts, len(body))
        return doc, (signature, _take_tensors(decoder, signature, doc, key))
    except InferdError as error:
        return doc, (signature, error)
    finally:
        doc[key] = None  # _take_tensors took it out; _predict checks that it was there


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

    def __init__(
        self, limits: RequestLimits, booleans: bool = True, texts: bool = True, size: int = 0
    ) -> None:
        """``booleans``, ``texts``: whether the body may hold JSON booleans (``may_hold_booleans``),
        strings (``may_hold_text``); when not, numbers are not searched for them. ``size``: the
        body's bytes (``text_swells``)."""
        self._limits = limits
        self._booleans = booleans
        self._texts = texts
        self._size = size
        self._text_room = max(TEXT_ARRAY_BYTES, 16 * size)  # for all the request's text arrays

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
            return {
                spec.name: self.array([item[spec.name] for item in instances], spec)
                for spec in signature.inputs
            }
        if any(named):
            raise InvalidArgument(
                "'instances' mixes named-input objects with plain values; use one form throughout"
            )
        if len(names) != 1:
            raise InvalidArgument(
                "instances is a plain list, but expecting list of objects as multiple input tensors "
                f"required as per tensorinfo_map: {','.join(names)}"
            )
        return {names[0]: self.array(instances, signature.inputs[0])}

    def columns(self, signature: Signature, inputs: Any) -> Tensors:
        """The columnar format: ``inputs``, one value or an object keyed by input name."""
        names = signature.input_names()
        if isinstance(inputs, dict) and not _is_b64(inputs):
            for name in names:
                if name not in inputs:
                    raise InvalidArgument(f"Missing named input: {name} in 'inputs' object.")
            return {spec.name: self.array(inputs[spec.name], spec) for spec in signature.inputs}
        if len(names) != 1:
            raise InvalidArgument(f"'inputs' must be an object with the keys {','.join(names)}")
        return {names[0]: self.array(inputs, signature.inputs[0])}

    def examples(self, signature: Signature, examples: list[Any], context: dict[str, Any]) -> Tensors:
        """Examples (objects of features) -> input tensors. Features are matched to inputs by
        name; with a one-input signature, a one-feature example gives that input whatever its name."""
        self._limits.instances("examples", len(examples))
        names = signature.input_names()
        if (serialized := self._serialized(signature, examples, context)) is not None:
            return {names[0]: serialized}
        for key, value in context.items():  # repeated in every row: counted before numpy copies it
            self._limits.elements(key, [len(examples), _count(value)])
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
        return {spec.name: self.array([row[spec.name] for row in rows], spec) for spec in signature.inputs}

    def _serialized(
        self, signature: Signature, examples: list[Any], context: dict[str, Any]
    ) -> np.ndarray | None:
        """For a signature whose one input is a string tensor not named by the features (a
        ``tf.Example`` parser, as TensorFlow's classify and regress signatures are), the examples
        as serialized ``tf.Example``s with the context merged in (a feature in both is the
        example's), as TF Serving feeds them; else None.

        Raises:
            ResourceExhausted: the context repeated in every example is too large
                (``RequestLimits.repeated_context``).
        """
        (spec, *others) = signature.inputs
        if others or spec.dtype.kind != "O":
            return None
        if all(isinstance(e, dict) and set(e) | set(context) == {spec.name} for e in examples):
            return None  # the feature feeds the input by name
        context_bytes = self._example(context).SerializeToString() if context else b""
        self._limits.repeated_context(spec.name, len(context_bytes), len(examples))
        serialized = np.empty(len(examples), dtype=object)
        for i, example in enumerate(examples):
            if not isinstance(example, dict):
                raise InvalidArgument(f"examples[{i}] must be an object of features")
            # after the context, as TF Serving concatenates them: a feature in both is the example's
            serialized[i] = context_bytes + self._example(example).SerializeToString()
        return serialized

    def _example(self, features: dict[str, Any]) -> Example:
        """JSON features (an example or the context) as a ``tf.Example`` (see ``_feature``)."""
        message = Example()
        for key, value in features.items():
            self._feature(message.features.feature[key], key, value)
        return message

    def _feature(self, feature: Feature, key: str, value: Any) -> None:
        """One JSON feature (a value or a list of them) into ``feature``, as TF Serving reads it:
        integers and booleans (1 and 0) as int64_list, other numbers as float_list, strings (as
        UTF-8) and ``{"b64": ...}`` as bytes_list; an empty list sets no kind.

        Raises:
            InvalidArgument: values of several kinds, an integer past int64, a lone surrogate.
        """
        values = value if isinstance(value, list) else [value]
        if not values:  # a feature of no kind, as TF Serving's: parsers read it as absent
            return
        if all(isinstance(v, int) for v in values):
            try:
                feature.int64_list.value.extend(map(int, values))  # protobuf deprecates bools there
            except ValueError:
                raise InvalidArgument(
                    f"Feature: {key} has an integer outside int64's range. Only int64_t is supported."
                ) from None
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(values)
        elif all(isinstance(v, str | dict) for v in values):
            try:
                items = [v.encode() if isinstance(v, str) else v for v in self._objects(values, key, 0)]
            except UnicodeEncodeError:
                raise InvalidArgument(f"feature {key!r}: a string has a lone surrogate (no UTF-8)") from None
            feature.bytes_list.value.extend(items)
        else:  # named by their JSON types: the repr of a value nested 1,000 deep raises
            kinds = sorted({_JSON_TYPES.get(type(v), type(v).__name__) for v in values})
            raise InvalidArgument(
                f'feature {key!r}: expected numbers, strings or {{"b64": ...}} values of one kind, '
                f"got {', '.join(kinds)}"
            )

    def array(self, value: Any, spec: TensorSpec) -> np.ndarray:
        """Nested JSON lists for input ``spec`` -> an ndarray; ``{"b64": ...}`` leaves become bytes.
        Numbers for a float input take its dtype; other dtypes are the JSON's (``_check_json_types``
        and ``conform_inputs`` check them)."""
        name = spec.name
        try:
            # strings numpy would pad to a huge text array are walked below, as objects
            swells = self._texts and text_swells(value, self._size, self._text_room)
            array = None if swells else np.asarray(value)
        except (ValueError, OverflowError):
            array = None  # ragged, too deep for numpy, or an integer past 64 bits: walked below
        if array is not None and array.dtype.kind in "US":
            self._text_room -= array.nbytes
        if array is not None and array.dtype.kind == "U" and not all_text(value):
            # numpy made the numbers among the strings text
            if spec.dtype.kind != "O":
                leaves = np.asarray(value, dtype=object).flat
                culprit = next(leaf for leaf in leaves if isinstance(leaf, str))
                raise _not_of_type(spec, culprit, "numbers and strings mixed")
            raise InvalidArgument(
                f"input {name!r}: values of different JSON types (e.g. numbers and strings) in one tensor"
            )
        numbers = array is not None and array.dtype.kind in "iuf" and spec.dtype.kind in "iuf"
        if self._booleans and numbers and (boolean := first_boolean(value)) is not None:
            raise _not_of_type(spec, boolean, "booleans among numbers")
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
                text = next((leaf for leaf in array.flat if isinstance(leaf, str)), None)
                if spec.dtype.kind != "O" and text is not None:  # as from a text array above
                    raise _not_of_type(spec, text, "numbers and strings mixed")
                raise InvalidArgument(
                    f"input {name!r}: values of different JSON types (e.g. numbers and strings) in one tensor"
                )
        self._limits.depth(name, array.ndim)
        self._limits.elements(name, array.shape)
        self._limits.text(name, array)
        if spec.dtype.kind == "f" and array.dtype.kind in "iuf" and array.dtype != spec.dtype:
            # read into the input's float type as TF Serving reads JSON (json_tensor.cc's
            # AddValueToTensor: GetFloat), a number past its range as an infinity
            array = array.astype(spec.dtype)
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


_JSON_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    dict: "object",
    list: "list",
    type(None): "null",
}
"""The JSON type of each Python type a JSON document parses into."""


def _count(value: Any) -> int:
    """The leaves of ``value`` (nested JSON lists), if it is rectangular: the product of the
    lengths of the first list at each depth."""
    count = 1
    while isinstance(value, list):
        count *= len(value)
        value = value[0] if value else None
    return count


def _is_b64(value: Mapping[str, Any]) -> bool:
    return len(value) == 1 and "b64" in value


def _jsonable(name: str, value: np.ndarray) -> Any:
    """An output ready for JSON: numeric arrays stay arrays; strings become str or b64 objects; a
    scalar (rank 0) is one bare value, as TF Serving writes it."""
    if value.dtype.kind in "OUS":
        as_b64 = name.endswith("_bytes")
        strings = np.frompyfunc(lambda item: _string(item, as_b64), 1, 1)(value)
        return np.asarray(strings, dtype=object).tolist()
    if not value.ndim:  # orjson writes no rank-0 array, and ascontiguousarray makes it rank 1
        return value.item()
    # The canonical native dtype (a view, no copy, where only the type differs): onnxruntime
    # returns int64 as numpy.longlong, whose scalars (rows of a 1-D output) orjson cannot write.
    canonical = _CANONICAL.get(value.dtype)
    if canonical is None:
        canonical = _CANONICAL[value.dtype] = np.dtype(value.dtype.str).newbyteorder("=")
    return np.ascontiguousarray(value, dtype=canonical)


_CANONICAL: dict[np.dtype[Any], np.dtype[Any]] = {}
"""Each output dtype met -> its canonical native dtype (a few entries: one per dtype)."""


def _string(item: Any, as_b64: bool) -> Any:
    if isinstance(item, bytes):
        if as_b64:
            return {"b64": base64.b64encode(item).decode()}
        try:
            return item.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(item).decode()}
    text = encodable(item if isinstance(item, str) else str(item))  # a lone surrogate has no UTF-8
    return {"b64": base64.b64encode(text.encode()).decode()} if as_b64 else text


def _per_row(outputs: dict[str, Any]) -> Any:
    """The row format's ``predictions``: the one output, or an object of every output per row.

    Raises:
        InvalidArgument: a scalar output (``_jsonable`` wrote it bare), or outputs whose batch
            sizes differ, in TF Serving's words.
    """
    for name, value in outputs.items():
        if not isinstance(value, np.ndarray | list):
            raise InvalidArgument(
                f"Tensor name: {name} has no shape information; a row-format response needs "
                "outputs of rank >= 1: use the columnar 'inputs' format"
            )
    if len(outputs) == 1:
        (only,) = outputs.values()
        return only
    sizes = {name: len(value) for name, value in outputs.items()}
    batch = set(sizes.values())
    if len(batch) != 1:
        raise InvalidArgument(
            f"outputs have inconsistent batch sizes {sizes}; use the columnar 'inputs' format"
        )
    (n,) = batch
    return [{name: value[i] for name, value in outputs.items()} for i in range(n)]


def _check_json_types(signature: Signature, inputs: Tensors) -> None:
    """Strings where numbers are declared, or numbers where strings are, refused in TF Serving's
    words (``JSON Value: "x" not of expected type: float``), then inferd's (the input, what it
    expected and what came)."""
    for spec in signature.inputs:
        value = inputs.get(spec.name)
        if value is None or not value.size:
            continue
        if (value.dtype.kind in "OUS") != (spec.dtype.kind == "O"):
            first = value.reshape(-1)[0]
            raise _not_of_type(spec, first, f"{dtype_of(value.dtype).v2} {list(value.shape)}")


def _not_of_type(spec: TensorSpec, value: object, got: str) -> InvalidArgument:
    """``value`` does not fit ``spec``'s type: TF Serving's words, then inferd's."""
    shown = json.dumps(
        value.decode(errors="replace")
        if isinstance(value, bytes)
        else value.item()
        if isinstance(value, np.generic)
        else value
    )
    expected = dtype_of(spec.dtype).tf.removeprefix("DT_").lower()
    return InvalidArgument(
        f"JSON Value: {shown[:40]} not of expected type: {expected}; "
        f"input {spec.name!r}: expected {spec.describe()}, got {got}"
    )


def _encode(document: dict[str, Any], outputs: Tensors) -> Response:
    """JSON for ``document``, which holds ``outputs``. orjson writes NaN and infinities as null,
    so a document with a non-finite float goes through the standard library, which writes NaN
    and Infinity tokens as TF Serving does. Only an answer with ``null`` in it is checked (the
    check costs more than the search)."""
    encoded = orjson.dumps(document, option=_NUMPY)
    if b"null" not in encoded or all(
        value.dtype.kind != "f" or np.isfinite(value).all() for value in outputs.values()
    ):
        return 200, _JSON, encoded
    return 200, _JSON, json.dumps(document, default=lambda a: a.tolist()).encode()


async def _classify_or_regress(
    call: Call,
    ref: ModelRef,
    method: Method,
    doc: dict[str, Any],
    deadline: float | None,
    limits: RequestLimits,
    offload: tuple[BodyDecoder | None, int] = (None, 0),
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
    await call.load(ref)
    signature = call.open(ref, doc.get("signature_name") or None, method)
    decoder = TensorDecoder(limits, size=offload[1])
    inputs = await decode(*offload, decoder.examples, signature, examples, context)
    response = await call.infer(inputs, deadline)
    if method is Method.REGRESS:
        name, values = regression_values(response, len(examples))
        return _encode({"results": _jsonable(name, values)}, response.outputs)
    results = [
        [[label, score] for label, score in zip(labels, scores, strict=True)]
        for labels, scores in classification_rows(response)
    ]
    return _encode({"results": results}, response.outputs)


def regression_values(response: InferenceResponse, count: int) -> tuple[str, np.ndarray]:
    """The one output a Regress answers with, as ``count`` values.

    Raises:
        InvalidArgument: several outputs, or not one value per example, in TF Serving's words
            (the signature does not regress: Predict serves it).
    """
    if len(response.outputs) != 1:
        raise InvalidArgument(
            f"Expected one output Tensor; model {response.model_id} returned {sorted(response.outputs)}: "
            "use Predict"
        )
    ((name, values),) = response.outputs.items()
    if values.shape not in ((count,), (count, 1)):
        raise InvalidArgument(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
            f"{list(values.shape)}; use Predict for a model with several outputs per example"
        )
    return name, values.reshape(count)


def classification_rows(response: InferenceResponse) -> list[tuple[list[str], list[float]]]:
    """Per example, its class labels and scores. A signature may give ``classes``, ``scores`` or
    both (as [examples, classes]); a missing one reads as "" labels or 0.0 scores, as TF Serving's.

    Raises:
        InvalidArgument: neither output, or shapes that do not agree (the signature does not
            classify: Predict serves it).
    """
    classes, scores = response.outputs.get("classes"), response.outputs.get("scores")
    given = [tensor for tensor in (classes, scores) if tensor is not None]
    if not given or given[0].ndim != 2 or any(tensor.shape != given[0].shape for tensor in given):
        raise InvalidArgument(
            f"Expected Tensor shape: [batch_size num_classes]; model {response.model_id} returned "
            f"classes and scores of shapes {None if classes is None else list(classes.shape)} and "
            f"{None if scores is None else list(scores.shape)}; use Predict"
        )
    count, width = given[0].shape
    label_rows = (
        [[""] * width] * count
        if classes is None
        else [
            [c.decode(errors="replace") if isinstance(c, bytes) else str(c) for c in row]
            for row in classes.tolist()
        ]
    )
    score_rows = [[0.0] * width] * count if scores is None else scores.astype(float).tolist()
    return list(zip(label_rows, score_rows, strict=True))


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
        return {
            "dtype": dtype_of(spec.dtype).tf,
            "tensor_shape": shape,
            "name": spec.tensor_name or spec.name,
        }

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
    }
