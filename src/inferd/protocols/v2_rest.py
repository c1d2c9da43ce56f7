"""The Open Inference Protocol (KServe V2) over REST, with Triton's binary tensor data extension.

Tensors in JSON are ``{"name", "datatype", "shape", "data"}`` with ``data`` flat or nested in
row-major order. With the binary extension the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw little-endian bytes of each tensor
that carries ``parameters.binary_data_size``, in order; numeric tensors are read and written
with ``np.frombuffer`` / ``tobytes``, without a loop over elements.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

import inferd
from inferd.control import ModelControl
from inferd.errors import InferdError, InvalidArgument, NotFound, Unavailable, encodable
from inferd.protocols.codecs import (
    SMALL_JSON,
    TEXT_ARRAY_BYTES,
    all_text,
    first_boolean,
    from_raw,
    leaves,
    may_hold_booleans,
    text_swells,
    to_raw,
)
from inferd.protocols.decoding import BodyDecoder, decode_apart
from inferd.protocols.limits import RequestLimits
from inferd.protocols.rest_status import JSON_HEADERS, Response, json_error, model_ref, with_version
from inferd.protocols.v2 import (
    V2_DATATYPES,
    V2_EXTENSIONS,
    V2_PLATFORMS,
    brief,
    refuse_unserved,
    v2_index,
    v2_model_config,
    v2_signature,
)
from inferd.protocols.v2_triton import load_failure, load_parameters, statistics, unknown_model
from inferd.service import Call, InferenceService
from inferd.types import (
    ACCEPTED_KINDS,
    ModelMetadata,
    ModelRef,
    Tensors,
    TensorSpec,
    dtype_of,
    integer_range_error,
)

PROTOCOL = "v2_rest"
HEADER_LENGTH = "inference-header-content-length"
ADMIN_PREFIX = "/v2/repository/"
"""Routes under this prefix are admin operations (the model repository extension)."""

_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/(\d+))?(/ready|/infer|/config|/stats)?")
_REPOSITORY_MODEL = re.compile(r"/v2/repository/models/([^/]+)/(load|unload)")
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


async def handle(
    service: InferenceService,
    control: ModelControl,
    method: str,
    path: str,
    body: bytes,
    request_id: str,
    limits: RequestLimits,
    deadline: float | None = None,
    decode_pool: BodyDecoder | None = None,
    header_length: str | None = None,
    traffic_key: str | None = None,
) -> Response:
    """Answer one request under ``/v2``. Expected failures become ``{"error": ...}`` responses; an
    inference request is counted and timed by its ``service.call``. Large bodies are decoded on
    ``decode_pool`` (see ``decoding``).

    ``header_length``: the ``Inference-Header-Content-Length`` header's value (binary tensors
    follow that many bytes of JSON); ``traffic_key``: the ``--traffic_key_header`` value, which
    chooses the version of a traffic split."""
    named: tuple[str, str | None] | None = None  # the model and version a /v2/models route names
    try:
        if method == "GET" and path in ("/v2", "/v2/"):
            return _json({"name": "inferd", "version": inferd.__version__, "extensions": list(V2_EXTENSIONS)})
        if method == "GET" and path == "/v2/health/live":
            return _json({"live": True})
        if method == "GET" and path == "/v2/health/ready":
            if not service.ready():
                raise Unavailable(
                    "the server is shutting down"
                    if service.draining
                    else "not every configured model has a version AVAILABLE yet"
                )
            return _json({"ready": True})
        if path.startswith(ADMIN_PREFIX):
            return await _repository(control, method, path, body)
        if method == "GET" and path == "/v2/models/stats":
            return _json(statistics(service, "", ""))
        match = _MODEL.fullmatch(path)
        if match is None:
            raise NotFound(f"no route for {method} {path}")
        name, version, action = match.groups()
        named = (name, version)
        ref = model_ref(name, version)
        if method == "POST" and action == "/infer":
            with service.call(PROTOCOL, name, request_id, traffic_key) as call:
                answer = await _infer(call, ref, header_length, body, deadline, limits, decode_pool)
                return with_version(answer, call.answered_by)
        if method == "GET" and action is None:
            return _json(_metadata(service.metadata(ref)))
        if method == "GET" and action == "/ready":
            service.metadata(ref)  # raises NotFound unless the version is AVAILABLE
            return _json({"name": name, "ready": True})
        if method == "GET" and action == "/config":
            return _json(v2_model_config(service.metadata(ref)))
        if method == "GET" and action == "/stats":
            return _json(statistics(service, name, version or ""))
        raise InvalidArgument(f"{method} is not allowed on {path}")
    except InferdError as error:
        if isinstance(error, NotFound) and named is not None:
            error = unknown_model(service, *named, error)
        return json_error(error)


def _json(document: Any) -> Response:
    return 200, JSON_HEADERS, orjson.dumps(document, option=_NUMPY)


async def _repository(control: ModelControl, method: str, path: str, body: bytes) -> Response:
    """The model repository extension: index, load, unload (the caller checked the admin token)."""
    if method != "POST":
        raise InvalidArgument(f"{method} is not allowed on {path}; the repository routes take POST")
    document = _optional_json(body)
    if path == ADMIN_PREFIX + "index":
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument(f"'ready' must be true or false, got {brief(ready)}")
        return _json(v2_index(control.index(ready)))
    match = _REPOSITORY_MODEL.fullmatch(path)
    if match is None:
        raise NotFound(f"no route for {method} {path}")
    name, action = match.groups()
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument("'parameters' must be an object")
    if action == "load":
        try:
            await control.load(name, load_parameters(name, parameters))
        except InferdError as error:
            raise load_failure(name, error) from None
        return _json({"name": name, "load": True})
    await control.unload(name)  # unload_dependents changes nothing: inferd has no ensembles
    return _json({"name": name, "unload": True})


def _optional_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the body must be a JSON object")
    return document


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": dtype_of(spec.dtype).v2,
        "shape": [-1] if spec.shape is None else list(spec.shape),
    }


def _metadata(meta: ModelMetadata) -> dict[str, Any]:
    signature = v2_signature(meta)
    return {
        "name": meta.model_id.name,
        "versions": [str(v) for v in meta.versions],
        "platform": V2_PLATFORMS.get(meta.platform, meta.platform),
        "inputs": [_tensor_metadata(spec) for spec in signature.inputs],
        "outputs": [_tensor_metadata(spec) for spec in signature.outputs],
        "parameters": {"device": meta.device},
    }


async def _infer(
    call: Call,
    ref: ModelRef,
    header_length: str | None,
    body: bytes,
    deadline: float | None,
    limits: RequestLimits,
    decode_pool: BodyDecoder | None = None,
) -> Response:
    doc, inputs = await decode_apart(
        decode_pool, _decode_cost(header_length, body), _decode_request, header_length, body, limits
    )
    await call.load(ref)
    # V2 tensors carry their datatype: they decode without the signature
    wanted = _wanted(doc, [spec.name for spec in call.open(ref).outputs])
    client_id = doc.get("id")
    if client_id is not None and not isinstance(client_id, str):
        raise InvalidArgument(f"'id' must be a string, got a JSON {_JSON_KINDS[type(client_id)]}")
    response = await call.infer(inputs, deadline, client_id)
    return _encode(response.model_id.name, str(response.model_id.version), doc, wanted, response.outputs)


def _decode_cost(header_length: str | None, body: bytes) -> int:
    """The bytes that decide where ``body`` is decoded (see ``decoding``): its JSON part when the
    binary tensors after it are numbers, taken as they are without parsing; the whole body when
    they may hold BYTES elements, which are split one by one (a JSON header with an escape is
    assumed to, as its datatype cannot be read without parsing)."""
    if header_length is None or not (header_length.isascii() and header_length.isdigit()):
        return len(body)
    size = min(int(header_length), len(body)) if len(header_length) <= 19 else len(body)
    head = body[:size]
    return len(body) if b"\\" in head or b"BYTES" in head.upper() else size


def _decode_request(
    header_length: str | None, body: bytes, limits: RequestLimits
) -> tuple[dict[str, Any], Tensors]:
    """The request's JSON document, without its ``inputs`` (whose JSON values are freed where this
    runs: on the decode thread for a large body), and the decoded input tensors."""
    doc, binary = split_body(header_length, body)
    end = len(body) - len(binary)
    booleans = may_hold_booleans(body, end)
    # no text array can swell from a small body (text_swells), and none from data without strings
    size = end if end <= SMALL_JSON or _data_may_hold_text(body, end, doc) else 0
    return doc, decode_inputs(doc.pop("inputs", None), binary, limits, booleans, size)


def split_body(header_length: str | None, body: bytes) -> tuple[dict[str, Any], memoryview]:
    """An inference request body -> its JSON document and the binary tensor bytes after it
    (empty without the ``Inference-Header-Content-Length`` header).

    Raises:
        InvalidArgument: the header is not a byte count within the body, or the JSON is not an object.
    """
    if header_length is not None:
        if (
            not (header_length.isascii() and header_length.isdigit())
            or len(header_length) > 19
            or int(header_length) > len(body)
        ):
            shown = header_length if len(header_length) <= 40 else f"{header_length[:40]}..."
            raise InvalidArgument(
                f"{HEADER_LENGTH} must be a byte count within the body ({len(body)} bytes), got {shown!r}"
            )
        split = int(header_length)
        header, binary = body[:split], memoryview(body)[split:]
    else:
        header, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        if header_length is not None and not header:
            raise InvalidArgument(
                f"{HEADER_LENGTH} 0 asks for Triton's raw binary request (one input's bytes without "
                "JSON), which inferd does not serve; send a JSON header and binary_data_size"
            ) from None
        hint = "" if header_length else f" (a body with binary tensors needs the {HEADER_LENGTH} header)"
        raise InvalidArgument(f"JSON Parse error: {exc}{hint}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the inference request must be a JSON object")
    return doc, binary


def decode_inputs(
    entries: Any, binary: memoryview, limits: RequestLimits, booleans: bool = True, body_bytes: int = 0
) -> Tensors:
    """The ``inputs`` of a V2 JSON request, with data in JSON or in ``binary`` (the bytes after
    the JSON header), every shape checked against ``limits`` before its tensor is made;
    ``booleans``: whether the JSON may hold booleans (``may_hold_booleans``), which numbers then
    are searched for; ``body_bytes``: the size of the request's JSON, 0 when its data holds no
    string (``text_swells``).

    Raises:
        InvalidArgument: a malformed entry, or data that does not fit its shape and datatype.
        ResourceExhausted: a shape or string over a limit.
    """
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    tensors: Tensors = {}
    offset = 0
    room = max(TEXT_ARRAY_BYTES, 16 * body_bytes)  # for all the request's text arrays (text_swells)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidArgument(f"inputs[{i}] must be an object with a string 'name'")
        name = entry["name"]
        if name in tensors:
            raise InvalidArgument(f"input {name!r} appears more than once in 'inputs'")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidArgument(f"input {name!r}: 'shape' must be a list of non-negative integers")
        datatype = entry.get("datatype")
        dtype = _V2_DTYPES.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise InvalidArgument(
                f"input {name!r}: unknown datatype {brief(datatype)}; expected one of {sorted(_V2_DTYPES)}"
            )
        count = limits.elements(name, shape)
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgument(f"input {name!r}: 'parameters' must be an object")
        refuse_unserved(f"input {name!r}", parameters)
        size = parameters.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:  # not a JSON boolean either
                raise InvalidArgument(
                    f"input {name!r}: parameters.binary_data_size must be a byte count (an integer "
                    f">= 0), got {brief(size)}"
                )
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input {name!r}: binary_data_size {size} does not fit the {len(binary) - offset} "
                    "binary bytes left in the body"
                )
            array = from_raw(binary[offset : offset + size], dtype, count, name, "binary_data_size", limits)
            offset += size
        elif "data" in entry:
            array, text_bytes = _from_json(
                entry["data"], dtype, count, name, limits, booleans, body_bytes, room
            )
            room -= text_bytes
        else:
            raise InvalidArgument(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        tensors[name] = array.reshape(shape)
    if offset != len(binary):
        raise InvalidArgument(f"the body has {len(binary) - offset} binary bytes that no input claims")
    return tensors


_KINDS = {**ACCEPTED_KINDS, "O": "U"}
"""What JSON ``data`` may hold: a BYTES tensor's values come as JSON strings only."""
_V2_DTYPES = {name: dtype_of(name).numpy for name in V2_DATATYPES}
"""The V2 datatype names, and only those (``float32`` or ``DT_FLOAT`` are not V2 names)."""


_JSON_KINDS: dict[type, str] = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    type(None): "null",
    dict: "object",
    list: "array",
}
"""Python types of parsed JSON values -> their JSON names, for messages."""
_JSON_TYPES = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float), "O": (str,)}
"""A datatype's kind -> the Python types of the JSON values it holds."""


def _from_json(
    data: Any,
    dtype: np.dtype[Any],
    count: int,
    name: str,
    limits: RequestLimits,
    booleans: bool,
    body_bytes: int,
    room: int,
) -> tuple[np.ndarray, int]:
    """``data`` as a flat ``dtype`` array of ``count`` elements, and the bytes of the numpy text
    array it was read through (0 for numbers; see ``text_swells`` and ``room``)."""
    if text_swells(data, body_bytes, room):
        return _strings(data, dtype, count, name, limits), 0
    try:
        nested = np.asarray(data)
    except (ValueError, OverflowError):
        raise _ragged(name, data, limits) from None
    limits.depth(name, nested.ndim)
    if nested.dtype.kind == "U" and not all_text(data):
        raise InvalidArgument(f"input {name!r}: 'data' mixes strings with other JSON values")
    flat = nested.reshape(-1)
    if flat.size != count:
        raise InvalidArgument(f"input {name!r}: shape needs {count} elements, 'data' has {flat.size}")
    if flat.size and flat.dtype.kind == "f" and dtype.kind in "iu":  # integers past INT64's range?
        flat = _wide_integers(name, data, dtype, flat)
    numbers = flat.dtype.kind in "iuf" and dtype.kind in "iuf"
    boolean = first_boolean(data) if booleans and numbers else None
    if flat.size and (flat.dtype.kind not in _KINDS[dtype.kind] or boolean is not None):
        raise _cannot_hold(name, dtype, list(leaves(data)))
    limits.text(name, flat)
    if (problem := integer_range_error(name, flat, dtype)) is not None:
        raise InvalidArgument(problem)
    # A number past a float datatype's range becomes an infinity, as Triton (a double assigned to
    # a float in http_server.cc's ReadDataFromJsonHelper) and KServe (np.array(data, dtype)) read it.
    array = flat.astype(dtype)
    return array, nested.nbytes if nested.dtype.kind in "US" else 0


def _strings(data: Any, dtype: np.dtype[Any], count: int, name: str, limits: RequestLimits) -> np.ndarray:
    """``_from_json`` for strings numpy would pad to a huge text array (``text_swells``): the
    same checks in the same order, on the strings as objects."""
    try:
        nested = np.array(data, dtype=object)
    except ValueError:
        raise _ragged(name, data, limits) from None
    limits.depth(name, nested.ndim)
    flat = nested.reshape(-1)
    if any(type(value) is list for value in flat):
        raise InvalidArgument(f"input {name!r}: 'data' is ragged or holds mixed values")
    texts = all(type(value) is str for value in flat)
    if not texts and all(type(value) in _TEXT_OR_NUMBER for value in flat):  # numpy: text of all
        raise InvalidArgument(f"input {name!r}: 'data' mixes strings with other JSON values")
    if flat.size != count:
        raise InvalidArgument(f"input {name!r}: shape needs {count} elements, 'data' has {flat.size}")
    if dtype.kind != "O" or not texts:  # numpy: text for numbers, or objects (null, {...})
        raise _cannot_hold(name, dtype, flat)
    if flat.size and max(map(len, flat)) * 4 > limits.max_string_bytes:
        limits.string(name, max(len(value.encode()) for value in flat))
    return flat


def _wide_integers(name: str, data: Any, dtype: np.dtype[Any], flat: np.ndarray) -> np.ndarray:
    """``flat``, numpy's floats for JSON ``data``, as UINT64 when every value is an integer in
    its range: numpy reads ``[18446744073709551615, 0]`` as FP64 (rounded), an integer past
    INT64's range among others. Else ``flat`` unchanged (floats the integer ``dtype`` refuses).

    Raises:
        InvalidArgument: integers of which one is outside ``dtype``'s range, named.
    """
    values = list(leaves(data))
    if not all(type(value) is int for value in values):
        return flat
    if min(values) >= 0 and max(values) <= np.iinfo(np.uint64).max:
        return np.array(values, dtype=np.uint64)  # then range-checked against ``dtype``
    info = np.iinfo(dtype)
    bad = next(value for value in values if not info.min <= value <= info.max)
    raise InvalidArgument(
        f"input {name!r}: value {bad} is out of range for {dtype_of(dtype).v2} [{info.min}, {info.max}]"
    )


def _ragged(name: str, data: Any, limits: RequestLimits) -> InvalidArgument:
    """The error for JSON ``data`` numpy cannot read as one array: ragged or mixed lists.

    Raises:
        InvalidArgument: ``data`` is nested past ``limits.max_json_depth`` (numpy refuses more
            than 64 dimensions before the depth is checked).
    """
    depth, item = 0, data
    while isinstance(item, list) and item:
        depth, item = depth + 1, item[0]
    limits.depth(name, depth)
    return InvalidArgument(f"input {name!r}: 'data' is ragged or holds mixed values")


_TEXT_OR_NUMBER = (str, int, float, bool)
"""The JSON values numpy reads as text among strings."""


def _cannot_hold(name: str, dtype: np.dtype[Any], values: Sequence[Any] | np.ndarray) -> InvalidArgument:
    """The error for ``values`` (a tensor's JSON leaves, not empty) of another JSON type than
    ``dtype`` holds, naming the first such value, else the first value."""
    fits = _JSON_TYPES[dtype.kind]
    first = next((value for value in values if type(value) not in fits), values[0])
    kind = _JSON_KINDS.get(type(first), type(first).__name__)
    return InvalidArgument(
        f"input {name!r}: datatype {dtype_of(dtype).v2} cannot hold JSON values like "
        f"{brief(first, json.dumps)} ({kind})"
    )


def _data_may_hold_text(body: bytes, end: int, doc: dict[str, Any]) -> bool:
    """Whether the inputs' ``data`` in ``body[:end]`` (the JSON of ``doc``) may hold a string:
    its quotes against those of every other string of ``doc``, keys included (an escaped quote
    or a repeated key only adds to the body's), so that ``text_swells`` looks at the data only
    where it might find one. The walk has no recursion (orjson reads 1,024 levels), skips lists
    of numbers at C speed, and stops once the other strings take every quote."""
    quotes = body.count(b'"', 0, end)
    beside = 0
    inputs = doc.get("inputs")
    pending: list[Any] = [{key: value for key, value in doc.items() if key != "inputs"}]
    if isinstance(inputs, list):
        beside += 1  # the key "inputs"
        for entry in inputs:
            if isinstance(entry, dict) and "data" in entry:
                beside += 1
                pending.append({key: value for key, value in entry.items() if key != "data"})
            else:
                pending.append(entry)
    else:
        pending.append({"inputs": inputs} if "inputs" in doc else None)
    while pending and 2 * beside < quotes:
        value = pending.pop()
        if isinstance(value, str):
            beside += 1
        elif isinstance(value, dict):
            beside += len(value)
            pending.extend(value.values())
        elif isinstance(value, list) and not _SCALARS.issuperset(map(type, value)):
            pending.extend(value)
    return 2 * beside < quotes


_SCALARS = frozenset({int, float, bool, type(None)})
"""JSON values that hold no string."""


def _wanted(doc: dict[str, Any], outputs: list[str]) -> list[tuple[str, bool]]:
    """The outputs a request asks for (of the model's ``outputs``), each with whether it is
    answered in binary.

    Raises:
        InvalidArgument: an unknown output, a malformed parameter, or one asking for what inferd
            does not serve.
    """
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidArgument("'parameters' must be an object")
    refuse_unserved("the request", parameters)
    binary_default = _flag(parameters, "binary_data_output", "parameters", False)
    requested = doc.get("outputs")
    if requested is None:
        return [(name, binary_default) for name in outputs]
    if not isinstance(requested, list):
        raise InvalidArgument("'outputs' must be a list of {\"name\": ...} objects")
    wanted: list[tuple[str, bool]] = []
    for entry in requested:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name not in outputs:
            raise InvalidArgument(f"unknown output {brief(name)}; the model has {sorted(outputs)}")
        if any(name == taken for taken, _ in wanted):
            raise InvalidArgument(f"output {name!r} appears more than once in 'outputs'")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidArgument(f"output {name!r}: 'parameters' must be an object")
        refuse_unserved(f"output {name!r}", params)
        wanted.append((name, _flag(params, "binary_data", f"output {name!r}: parameters", binary_default)))
    return wanted


def _encode(
    model: str, version: str, doc: dict[str, Any], wanted: list[tuple[str, bool]], outputs: Tensors
) -> Response:
    described, chunks = [], []
    for name, as_binary in wanted:
        value = outputs[name]
        datatype = dtype_of(value.dtype).v2
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if as_binary:
            raw = to_raw(value)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif value.dtype.kind in "OUS":
            tensor["data"] = [_text(item) for item in value.reshape(-1).tolist()]
        else:
            tensor["data"] = np.ascontiguousarray(value).reshape(-1)
        described.append(tensor)
    document: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": described}
    if isinstance(doc.get("id"), str):
        document["id"] = doc["id"]
    header = orjson.dumps(document, option=_NUMPY)  # NaN and infinities as null: strict JSON
    if not chunks:
        return 200, JSON_HEADERS, header
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return 200, headers, b"".join([header, *chunks])


def _flag(parameters: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}.{key} must be true or false, got {brief(value)}")
    return value


def _text(item: Any) -> str:
    if isinstance(item, bytes):
        return item.decode(errors="replace")
    return encodable(str(item))  # a model's lone surrogate has no UTF-8
