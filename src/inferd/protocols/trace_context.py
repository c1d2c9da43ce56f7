"""The W3C ``traceparent`` of a gRPC call, read from its metadata for the request's span (see
``inferd.tracing``); the REST twin is one line in ``server.HttpApp``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from inferd.protocols.grpc_status import Handler
from inferd.tracing import TRACEPARENT


class TraceContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets ``TRACEPARENT`` for the handler of every unary call that carries the metadata."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        traceparent = next((str(v) for k, v in metadata if k == "traceparent"), None)
        if handler is None or traceparent is None or handler.unary_unary is None:
            return handler  # streams keep no request span of their own
        inner = handler.unary_unary

        async def traced(request: Any, context: Any) -> Any:
            TRACEPARENT.set(traceparent)  # this call's task only
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            traced, handler.request_deserializer, handler.response_serializer
        )
