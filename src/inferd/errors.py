"""The exception tree and the one table from error codes to HTTP statuses and gRPC codes."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """An expected failure's kind, with its HTTP status and gRPC status code name."""

    INVALID_ARGUMENT = (400, "INVALID_ARGUMENT")
    UNAUTHENTICATED = (401, "UNAUTHENTICATED")
    PERMISSION_DENIED = (403, "PERMISSION_DENIED")
    NOT_FOUND = (404, "NOT_FOUND")
    RESOURCE_EXHAUSTED = (413, "RESOURCE_EXHAUSTED")
    UNAVAILABLE = (503, "UNAVAILABLE")
    DEADLINE_EXCEEDED = (504, "DEADLINE_EXCEEDED")
    INTERNAL = (500, "INTERNAL")
    UNIMPLEMENTED = (501, "UNIMPLEMENTED")

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def grpc_code(self) -> str:
        return self.value[1]


class InferdError(Exception):
    """Base of every expected failure. The message names the field and what was expected.

    Messages echo what clients sent (names, keys, labels), which may hold lone surrogates (a
    JSON ``"\\ud800"`` escape) that no UTF-8 encoder takes; ``message`` has them escaped as
    ``\\ud800``, so every protocol can write it.
    """

    code = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = encodable(message)
        super().__init__(message)
        self.message = message


def encodable(text: str) -> str:
    """``text`` with every lone surrogate replaced by its ``\\uXXXX`` escape: valid UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


class InvalidArgument(InferdError):
    """The request is malformed or does not fit the model's signature."""

    code = ErrorCode.INVALID_ARGUMENT


class Unauthenticated(InferdError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(InferdError):
    code = ErrorCode.PERMISSION_DENIED


class NotFound(InferdError):
    """Unknown model, version, label or signature."""

    code = ErrorCode.NOT_FOUND


class UnknownLabel(NotFound):
    """A version label the model does not have: NOT_FOUND, except on TF Serving's v1 REST API,
    which answers it as INVALID_ARGUMENT (400)."""


class ResourceExhausted(InferdError):
    """The request is over a configured size limit."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(InferdError):
    """Try again later: overloaded, not ready or shutting down. HTTP adds ``Retry-After``."""

    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(InferdError):
    code = ErrorCode.DEADLINE_EXCEEDED


DEADLINE_PASSED = "the request's deadline passed"
"""The message of the cancellation that stops a request's work when its deadline passes: the
request is then counted as DEADLINE_EXCEEDED, where other cancellations (a client that went
away, the end of a drain) count as CANCELLED."""


class Internal(InferdError):
    """Something unexpected; the message is safe to show (no internals)."""

    code = ErrorCode.INTERNAL


class Unimplemented(InferdError):
    """A well-formed request for something not served: a MultiInference task method other than
    classify or regress, as TF Serving answers it."""

    code = ErrorCode.UNIMPLEMENTED


class ModelLoadError(InferdError):
    """A version could not be loaded; its message goes into the version's status."""

    code = ErrorCode.INVALID_ARGUMENT


class ConfigError(InferdError):
    """The server or model configuration is invalid; raised at startup or on reload."""

    code = ErrorCode.INVALID_ARGUMENT
