"""What both gRPC adapters share: how a call ends, and the gate in front of them (the bearer
token, then the in-flight byte budget).

An ``InferdError`` aborts the call with the gRPC code of the ``errors`` table and its message;
anything else is logged with the request id and answered INTERNAL, with no internals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from contextvars import ContextVar
from typing import Any, TypeAlias, TypeVar, cast

import grpc

from inferd.errors import InferdError, encodable
from inferd.protocols.access import Access
from inferd.protocols.decoding import BodyDecoder, off_loop
from inferd.protocols.limits import HELD, InflightBytes

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
        await context.abort(grpc.StatusCode[error.code.grpc_code], details(error.message))
    except Exception:
        log.exception("gRPC request %s failed", request_id)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error; request id {request_id}")
    raise AssertionError("context.abort raises")


MAX_DETAILS_BYTES = 2048
"""The most UTF-8 bytes of a message that a failed call's status carries. It travels in the
trailing metadata (``grpc-message``, each byte outside printable ASCII percent-encoded as
three), which gRPC clients refuse past 8-16 KiB by default: a message echoing a 100 KB name
reached the client as RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"."""


def details(message: str) -> str:
    """``message`` cut to ``MAX_DETAILS_BYTES`` UTF-8 bytes (with the length it had), for a status."""
    data = message.encode(errors="replace")
    if len(data) <= MAX_DETAILS_BYTES:
        return message
    return f"{data[:MAX_DETAILS_BYTES].decode(errors='ignore')}... ({len(message)} characters)"


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
    """The gate in front of every call. It runs on the call's metadata, before its request
    message is read, and:

    - checks the ``authorization`` metadata (``Bearer <token>``) of every call that needs it
      (admin methods always, every method when an API token is set; see ``Access``); a refused
      call ends without its message being read, so a large message without a token costs
      nothing;
    - holds each unary call's request message in ``inflight`` from the moment it is received
      (its size is known only then) until the call ends, and refuses it with UNAVAILABLE, before
      it is parsed, when the budget cannot hold it.
    """

    def __init__(
        self, access: Access, admin_methods: Collection[str], inflight: InflightBytes | None = None
    ) -> None:
        self._access = access
        self._admin_methods = frozenset(admin_methods)
        self._inflight = inflight
        self._budgeted: dict[str, tuple[Handler, Handler]] = {}  # method -> (handler, under budget)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        admin = method in self._admin_methods
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if admin or self._access.api_token:
            metadata = handler_call_details.invocation_metadata or ()
            authorization = next((str(v) for k, v in metadata if k == "authorization"), None)
            try:
                self._access.check(authorization, admin)
            except InferdError as error:
                return _refusal(handler, error)
        if self._inflight is None or handler.request_streaming or handler.response_streaming:
            return handler
        # The handler is made anew for a call that the interceptors behind give one of its own
        # (a traceparent's): the one kept is used only while it is the handler given.
        made = self._budgeted.get(method)
        if made is None or made[0] is not handler:
            made = self._budgeted[method] = (handler, _under_budget(handler, self._inflight))
        return made[1]


def _under_budget(handler: Handler, inflight: InflightBytes) -> Handler:
    """``handler`` (unary-unary) taking its request as received bytes: they are held in
    ``inflight`` until the call ends, and parsed only once held."""
    parse = handler.request_deserializer
    behavior = cast(Callable[[Any, Context], Awaitable[Any]], handler.unary_unary)

    async def held(raw: bytes, context: Context) -> Any:
        reservation = inflight.reservation()
        token = HELD.set(reservation)  # what the call's decoded strings take is held in it too
        try:
            try:
                reservation.grow_to(len(raw))
            except InferdError as error:
                await context.abort(grpc.StatusCode[error.code.grpc_code], error.message)
            request = parse(raw) if parse else raw
            return await behavior(request, context)
        finally:
            HELD.reset(token)
            reservation.release()

    return grpc.unary_unary_rpc_method_handler(held, None, handler.response_serializer)


def _refusal(handler: Handler, error: InferdError) -> Handler:
    """A handler that ends the call with ``error``'s status without reading its request message:
    it is declared request-streaming, which on the wire is the same call."""

    async def refuse(requests: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode[error.code.grpc_code], error.message)

    make = (
        grpc.stream_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.stream_unary_rpc_method_handler
    )
    return make(refuse, handler.request_deserializer, handler.response_serializer)


def message_bytes() -> int:
    """The size in bytes of the request message of the unary call being served (0 outside a call
    that ``DecodeInterceptor`` parsed): a servicer decodes the tensors of a large one off the event
    loop, as ``decoding.decode`` does for a REST body of that size."""
    return _MESSAGE_BYTES.get()


_MESSAGE_BYTES: ContextVar[int] = ContextVar("inferd_grpc_message_bytes", default=0)


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Parses each unary request message: inline when it is small, on ``pool``'s decode thread
    when ``decoding.off_loop`` says so, its size then told by ``message_bytes()``. Answers one
    that does not parse (e.g. a string field holding bytes that are not UTF-8, such as an encoded
    lone surrogate) with INVALID_ARGUMENT, instead of the UNKNOWN and the logged traceback that
    grpc gives when a request deserializer raises. The guarded handler of each method is made once."""

    def __init__(self, pool: BodyDecoder | None = None) -> None:
        self._pool = pool
        self._guarded: dict[str, tuple[Handler, Handler]] = {}  # method -> (handler, guarded)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        method = handler_call_details.method
        made = self._guarded.get(method)
        if made is None or made[0] is not handler:
            made = self._guarded[method] = (handler, _guarded(method, handler, self._pool))
        return made[1]


def _guarded(method: str, handler: Handler, pool: BodyDecoder | None) -> Handler:
    """``handler`` (unary-unary) parsing its request itself (a large one on ``pool``), answering
    INVALID_ARGUMENT when the message does not parse."""
    parse, behaviour = handler.request_deserializer, handler.unary_unary
    if parse is None or behaviour is None:
        return handler

    async def guarded(data: bytes, context: Context) -> Any:
        size = len(data)
        _MESSAGE_BYTES.set(size)  # the call's own task: seen by this call's servicer only
        try:
            request = await pool.on_thread(parse, data) if off_loop(pool, size) else parse(data)
        except Exception as exc:  # protobuf's DecodeError, or a subclass of it
            message = f"the request is not a valid {method} message: {exc}"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, encodable(message))
        return await behaviour(request, context)  # type: ignore[arg-type]  # stubs name sync contexts

    return grpc.unary_unary_rpc_method_handler(guarded, None, handler.response_serializer)
