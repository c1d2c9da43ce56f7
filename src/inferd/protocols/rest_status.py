"""How a REST call ends, in both dialects (TF Serving's ``/v1`` and the Open Inference
Protocol's ``/v2``): the status from the ``errors`` table and ``{"error": "<message>"}`` for a
failure; and the model a URL names. The twin of ``grpc_status``."""

from __future__ import annotations

import orjson

from inferd.errors import InferdError, InvalidArgument
from inferd.types import ModelRef

Response = tuple[int, dict[str, str], bytes]
"""HTTP status, headers, body."""

JSON_HEADERS = {"content-type": "application/json"}

VERSION_HEADER = "x-inferd-model-version"
"""Response header naming the version that answered an inference request (both dialects)."""


def with_version(response: Response, version: int | None) -> Response:
    """``response`` with ``VERSION_HEADER`` added when a version answered."""
    if version is None:
        return response
    status, headers, body = response
    return status, {**headers, VERSION_HEADER: str(version)}, body


def model_ref(name: str, version: str | None, label: str | None = None) -> ModelRef:
    """The model a URL names; ``version`` is the digits the route matched.

    Raises:
        InvalidArgument: the version does not fit in int64 (TF Serving's message).
    """
    if version is None:
        return ModelRef(name, label=label)
    # ASCII only: the route's \d also matches other scripts' digits, which int() would read.
    if not version.isascii() or len(version.lstrip("0")) > 19 or int(version) >= 2**63:
        shown = version if len(version) <= 40 else f"{version[:40]}... ({len(version)} characters)"
        raise InvalidArgument(f"Failed to convert version: {shown} to numeric.")
    return ModelRef(name, version=int(version))


def json_error(error: InferdError) -> Response:
    """The status, headers and ``{"error": ...}`` body for an expected failure; 503 adds
    ``Retry-After`` and 401 ``WWW-Authenticate``."""
    headers = dict(JSON_HEADERS)
    if error.code.http_status == 503:
        headers["retry-after"] = "1"
    elif error.code.http_status == 401:
        headers["www-authenticate"] = "Bearer"
    return error.code.http_status, headers, orjson.dumps({"error": error.message})
