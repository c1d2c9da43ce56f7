"""What both gRPC adapters share: the call context their servicers see, how a call ends, and the
bearer token check in front of them.

An ``InferdError`` aborts the call with the gRPC code of the ``errors`` table and its message;
anything else is logged with the request id and answered INTERNAL, with no internals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any, NoReturn, Protocol, TypeAlias, TypeVar

import grpc

from inferd.errors import InferdError
from inferd.protocols.access import Access

log = logging.getLogger(__name__)

T = TypeVar("T")


class Context(Protocol):
    """What inferd's servicers use of a call, on the event loop: ``grpc_port``'s view of a
    grpcio call, or ``inferd.ray.grpc_ingress``'s of a Serve call."""

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        """The call's metadata, keys in lower case."""

    def time_remaining(self) -> float | None:
        """Seconds left before the client's deadline; None without one."""

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        """Send ``metadata`` with the call's status."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        """End the call with ``code`` and ``details``: raises, the servicer's code stops here."""


class Aborted(Exception):
    """How a servicer's call ends with a status other than OK (see ``Context.abort``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


def deadline_of(context: Context) -> float | None:
    """The client's deadline as ``time.monotonic()``, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def answer(context: Context, call: Coroutine[Any, Any, T], request_id: str) -> T:
    """Await ``call``; abort ``context`` with the status of a failure. (An inference call counts
    and times itself: see ``InferenceService.call``.)"""
    try:
        return await call
    except InferdError as error:
        await context.abort(grpc.StatusCode[error.code.grpc_code], error.message)
    except Exception:
        log.exception("gRPC request %s failed", request_id)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error; request id {request_id}")
    raise AssertionError("context.abort raises")


VERSION_KEY = "inferd-model-version"
"""Trailing metadata key naming the version that answered an inference request."""


def traffic_key(context: Context, key: str) -> str | None:
    """The value of the invocation metadata entry ``key`` (lower case; "" for none): the request's
    traffic key (``--traffic_key_header``)."""
    if not key:
        return None
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def tell_version(context: Context, version: int | None) -> None:
    """Name the version that answered in the trailing metadata (``VERSION_KEY``)."""
    if version is not None:
        context.set_trailing_metadata(((VERSION_KEY, str(version)),))


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # subscriptable for type checkers only


class AccessInterceptor(grpc.ServerInterceptor):
    """Checks the ``authorization`` metadata (``Bearer <token>``) of every call that needs it:
    admin methods always, every method when an API token is set (see ``Access``). It runs on the
    call's metadata, before its request message is read: a refused call ends without it, so a
    large message without a token costs nothing."""

    def __init__(self, access: Access, admin_methods: Collection[str]) -> None:
        self._access = access
        self._admin_methods = frozenset(admin_methods)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        admin = handler_call_details.method in self._admin_methods
        if handler is None or not (admin or self._access.api_token):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        authorization = next((str(v) for k, v in metadata if k == "authorization"), None)
        try:
            self._access.check(authorization, admin)
        except InferdError as error:
            log.debug("gRPC call to %s refused: %s", handler_call_details.method, error.message)
            return _refusal(handler, error)
        return handler


def _refusal(handler: Handler, error: InferdError) -> Handler:
    """A handler that ends the call with ``error``'s status without reading its request message:
    it is declared request-streaming, which on the wire is the same call."""

    def refuse(requests: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode[error.code.grpc_code], error.message)

    make = (
        grpc.stream_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.stream_unary_rpc_method_handler
    )
    return make(refuse, handler.request_deserializer, handler.response_serializer)
