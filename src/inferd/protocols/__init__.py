"""Protocol adapters: each decodes its wire format, calls ``InferenceService``, encodes the answer.

Both REST dialects (TF Serving's ``/v1`` and the Open Inference Protocol's ``/v2``) answer
errors the same way: the status from the ``errors`` table and ``{"error": "<message>"}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson

from inferd.errors import InferdError, InvalidArgument
from inferd.metrics import Metrics
from inferd.service import InferenceService
from inferd.types import InferenceResponse, ModelRef

Response = tuple[int, dict[str, str], bytes]
"""HTTP status, headers, body."""

JSON_HEADERS = {"content-type": "application/json"}


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
