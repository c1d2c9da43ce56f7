"""Protocol adapters: each decodes its wire format, calls ``InferenceService``, encodes the answer.

The adapters are ``tfserving_rest``, ``tfserving_grpc``, ``v2_rest`` and ``v2_grpc``; ``openapi``
describes the REST APIs. Beside them, each shared concern has a module named for its job:
``access`` (bearer tokens), ``codecs`` (tensor encodings, importable by clients without the
server), ``deadlines`` (the REST port's request deadlines, on one timer), ``limits`` (request
size limits), ``v2`` (the V2 vocabulary), ``rest_status`` and ``grpc_status`` (how a call ends);
an inference request is counted and timed by its ``InferenceService.call``. This face only
re-exports the names that need nothing of the server.
"""

from __future__ import annotations

from inferd.protocols.access import Access
from inferd.protocols.codecs import decode_tensor, encode_tensor, from_raw, to_raw
from inferd.protocols.rest_status import JSON_HEADERS, Response, json_error, model_ref

__all__ = [
    "JSON_HEADERS",
    "Access",
    "Response",
    "decode_tensor",
    "encode_tensor",
    "from_raw",
    "json_error",
    "model_ref",
    "to_raw",
]
