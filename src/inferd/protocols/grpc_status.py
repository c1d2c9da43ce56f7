"""What both gRPC adapters share: how a call ends, and the bearer-token check in front of them.

An ``InferdError`` aborts the call with the gRPC code of the ``errors`` table and its message;
anything else is logged with the request id and answered INTERNAL, with no internals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, TypeAlias, TypeVar

import grpc

from inferd.errors import InferdError
from inferd.protocols.access import Access

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


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


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Checks the ``authorization`` metadata (``Bearer <token>``) of every call that needs it:
    admin methods always, every method when an API token is set (see ``Access``)."""

    def __init__(self, access: Access, admin_methods: Collection[str]) -> None:
        self._access = access
        self._admin_methods = frozenset(admin_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        admin = handler_call_details.method in self._admin_methods
        handler = await continuation(handler_call_details)
        if handler is None or not (admin or self._access.api_token):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        authorization = next((str(v) for k, v in metadata if k == "authorization"), None)
        try:
            self._access.check(authorization, admin)
        except InferdError as error:
            return _refusal(handler, error)
        return handler


def _refusal(handler: Handler, error: InferdError) -> Handler:
    """A handler of the same kind as ``handler`` that ends the call with ``error``'s status."""

    async def refuse(request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode[error.code.grpc_code], error.message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[handler.request_streaming, handler.response_streaming]
    return make(refuse, handler.request_deserializer, handler.response_serializer)
