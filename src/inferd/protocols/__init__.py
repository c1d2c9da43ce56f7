"""Protocol adapters: each decodes its wire format, calls ``InferenceService``, encodes the answer.

Both REST dialects (TF Serving's ``/v1`` and the Open Inference Protocol's ``/v2``) answer
errors the same way: the status from the ``errors`` table and ``{"error": "<message>"}``.
"""

from __future__ import annotations

import hmac
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from inferd.control import IndexEntry
from inferd.errors import InferdError, InvalidArgument, PermissionDenied, Unauthenticated
from inferd.metrics import Metrics
from inferd.protocols.limits import RequestLimits
from inferd.service import InferenceService
from inferd.types import InferenceResponse, ModelMetadata, ModelRef, TensorSpec, VersionState, dtype_of

Response = tuple[int, dict[str, str], bytes]
"""HTTP status, headers, body."""

JSON_HEADERS = {"content-type": "application/json"}

V2_PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "sklearn": "sklearn",
    "python": "python",
    "tensorflow": "tensorflow_savedmodel",
    "torch": "pytorch_libtorch",
}
"""Runtime name -> the ``platform`` the Open Inference Protocol reports."""

V2_EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "parameters", "statistics")
"""What ``GET /v2`` and ServerMetadata advertise (binary_tensor_data is HTTP's raw-bytes twin of
gRPC's raw contents)."""

V2_DATATYPES = (
    *("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"),
    *("FP16", "FP32", "FP64", "BYTES"),
)
"""The Open Inference Protocol's datatype names."""

_TRITON_STATES = {
    VersionState.START: "LOADING",
    VersionState.LOADING: "LOADING",
    VersionState.AVAILABLE: "READY",
    VersionState.UNLOADING: "UNLOADING",
    VersionState.END: "UNAVAILABLE",
}


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call what. With ``api_token`` set every call needs a bearer token; admin calls
    (load, unload, reload config) need ``admin_token``, and are refused when it is unset. The
    admin token also opens every other call. Empty strings mean unset."""

    api_token: str = ""
    admin_token: str = ""

    def check(self, authorization: str | None, admin: bool) -> None:
        """Check an ``Authorization`` header (``Bearer <token>``) for a call.

        Raises:
            PermissionDenied: admin calls are disabled, or the API token was used for one.
            Unauthenticated: the token is missing or matches none.
        """
        if admin and not self.admin_token:
            raise PermissionDenied(
                "admin operations are disabled; start inferd with --admin_token (or INFERD_ADMIN_TOKEN)"
            )
        if not admin and not self.api_token:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("this call needs an 'Authorization: Bearer <token>' header")
        token = token.strip()
        if _same(token, self.admin_token) or (not admin and _same(token, self.api_token)):
            return
        if admin and _same(token, self.api_token):
            raise PermissionDenied("the API token does not allow admin operations; use the admin token")
        raise Unauthenticated("the bearer token is not valid")


def _same(given: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def v2_index(entries: list[IndexEntry]) -> list[dict[str, str]]:
    """The model repository index as V2 rows: name, version, Triton's state, and the reason."""
    rows = []
    for entry in entries:
        row = {"name": entry.name, "version": entry.version}
        row["state"] = "UNAVAILABLE" if entry.state is None else _TRITON_STATES[entry.state]
        if entry.reason:
            row["reason"] = entry.reason
        rows.append(row)
    return rows


def v2_model_config(meta: ModelMetadata) -> dict[str, Any]:
    """Triton's model configuration as perf_analyzer reads it (JSON field names of its
    ModelConfig proto): dims exclude the batch dimension when the model is batched
    (``max_batch_size`` > 0)."""
    signature = meta.signatures["serving_default"]
    batched = meta.max_batch_size > 0

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        dims = [-1] if spec.shape is None else list(spec.shape)
        return {
            "name": spec.name,
            "data_type": "TYPE_" + ("STRING" if spec.dtype.kind == "O" else dtype_of(spec.dtype).v2),
            "dims": dims[1:] if batched and dims else dims,
        }

    config: dict[str, Any] = {
        "name": meta.model_id.name,
        "platform": V2_PLATFORMS.get(meta.platform, meta.platform),
        "backend": meta.platform,
        "max_batch_size": meta.max_batch_size,
        "input": [tensor(spec) for spec in signature.inputs],
        "output": [tensor(spec) for spec in signature.outputs],
    }
    if batched:
        config["dynamic_batching"] = {}
    return config


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
    ``Retry-After`` and 401 ``WWW-Authenticate``."""
    headers = dict(JSON_HEADERS)
    if error.code.http_status == 503:
        headers["retry-after"] = "1"
    elif error.code.http_status == 401:
        headers["www-authenticate"] = "Bearer"
    return error.code.http_status, headers, orjson.dumps({"error": error.message})


@dataclass(slots=True)
class RequestTiming:
    """When one inference request's stages ended (``time.perf_counter``), for the metrics:
    ``decoded`` when its tensors were ready, ``resumed`` when the adapter got the answer back."""

    started: float
    decoded: float = 0.0
    resumed: float = 0.0
    response: InferenceResponse | None = None

    def answered(self, response: InferenceResponse) -> InferenceResponse:
        """Note the service's answer and the time it came back; returns it."""
        self.resumed = time.perf_counter()
        self.response = response
        return response


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
    # handoff: from decoded to resumed, what was neither features, queue nor predict: validation,
    # and the event loop's delay in taking the answer back from the predict thread.
    measured = response.features_s + response.queue_s + response.predict_s
    metrics.timer(model, version, protocol).observe(
        timing.decoded - timing.started,
        response.features_s,
        response.queue_s,
        response.predict_s,
        max(0.0, timing.resumed - timing.decoded - measured),
        ended - timing.resumed,
        ended - timing.started,
    )


def from_raw(
    raw: bytes | memoryview, dtype: np.dtype[Any], count: int, name: str, source: str, limits: RequestLimits
) -> np.ndarray:
    """V2 raw tensor bytes (REST binary extension, gRPC raw contents) as a flat array of ``count``
    elements: numbers little-endian with no copy, BYTES as 4-byte-length-prefixed elements.

    Raises:
        InvalidArgument: the byte count does not fit ``count`` elements; ``source`` names the
            field that gave the size.
        ResourceExhausted: a BYTES element is over ``limits.max_string_bytes``.
    """
    if dtype.kind != "O":
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {name!r}: {count} elements of {dtype_of(dtype).v2} take "
                f"{count * dtype.itemsize} bytes, {source} says {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if len(items) == count:
            raise InvalidArgument(f"input {name!r}: shape needs {count} BYTES elements, the data has more")
        if pos + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: a BYTES element's 4-byte length is cut off")
        (length,) = struct.unpack_from("<I", raw, pos)
        limits.string(name, length)
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
