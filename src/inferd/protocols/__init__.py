"""Protocol adapters: each decodes its wire format, calls ``InferenceService``, encodes the answer.

Both REST dialects (TF Serving's ``/v1`` and the Open Inference Protocol's ``/v2``) answer
errors the same way: the status from the ``errors`` table and ``{"error": "<message>"}``.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from inferd.errors import InferdError, InvalidArgument
from inferd.metrics import Metrics
from inferd.service import InferenceService
from inferd.types import InferenceResponse, ModelRef, dtype_of

Response = tuple[int, dict[str, str], bytes]
"""HTTP status, headers, body."""

JSON_HEADERS = {"content-type": "application/json"}

V2_PLATFORMS = {"onnx": "onnxruntime_onnx", "sklearn": "sklearn", "python": "python"}
"""Runtime name -> the ``platform`` the Open Inference Protocol reports."""


def model_ref(name: str, version: str | None, label: str | None = None) -> ModelRef:
    """The model a URL names; ``version`` is the digits the route matched.

    Raises:
        InvalidArgument: the version does not fit in int64 (TF Serving's message).
    """
    if version is None:
        return ModelRef(name, label=label)
    number = int(version)
    if number >= 2**63:
        raise InvalidArgument(f"Failed to convert version: {version} to numeric.")
    return ModelRef(name, version=number)


def json_error(error: InferdError) -> Response:
    """The status, headers and ``{"error": ...}`` body for an expected failure; 503 adds
    ``Retry-After``."""
    headers = dict(JSON_HEADERS)
    if error.code.http_status == 503:
        headers["retry-after"] = "1"
    return error.code.http_status, headers, orjson.dumps({"error": error.message})


@dataclass(slots=True)
class RequestTiming:
    """When one inference request's stages ended (``time.perf_counter``), for the metrics."""

    started: float
    decoded: float = 0.0
    response: InferenceResponse | None = None


def record_request(
    metrics: Metrics, service: InferenceService, protocol: str, model: str, status: str, timing: RequestTiming
) -> None:
    """Count a finished inference request and, when it was answered, time its stages."""
    response = timing.response
    if response is None:
        metrics.count_request(model if service.knows(model) else "", "", protocol, status)
        return
    version = str(response.model_id.version)
    metrics.count_request(model, version, protocol, status)
    ended = time.perf_counter()
    inferred = timing.decoded + response.queue_s + response.predict_s
    metrics.timer(model, version, protocol).observe(
        timing.decoded - timing.started,
        response.queue_s,
        response.predict_s,
        max(0.0, ended - inferred),
        ended - timing.started,
    )


def from_raw(raw: bytes | memoryview, dtype: np.dtype[Any], count: int, name: str, source: str) -> np.ndarray:
    """V2 raw tensor bytes (REST binary extension, gRPC raw contents) as a flat array of ``count``
    elements: numbers little-endian with no copy, BYTES as 4-byte-length-prefixed elements.

    Raises:
        InvalidArgument: the byte count does not fit ``count`` elements; ``source`` names the
            field that gave the size.
    """
    if dtype.kind != "O":
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {name!r}: {count} elements of {dtype_of(dtype).v2} take "
                f"{count * dtype.itemsize} bytes, {source} says {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: a BYTES element's 4-byte length is cut off")
        (length,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + length > len(raw):
            raise InvalidArgument(f"input {name!r}: a BYTES element runs past the end of its data")
        items.append(bytes(raw[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    if len(items) != count:
        raise InvalidArgument(
            f"input {name!r}: shape needs {count} BYTES elements, the data has {len(items)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def to_raw(value: np.ndarray) -> bytes:
    """An output's V2 raw bytes: little-endian row-major numbers, or length-prefixed BYTES."""
    if value.dtype.kind in "OUS":
        parts = []
        for item in value.reshape(-1).tolist():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
