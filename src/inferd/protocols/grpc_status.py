"""How both gRPC adapters end a call: with its answer, or with the gRPC status of a failure.

An ``InferdError`` aborts the call with the gRPC code of the ``errors`` table and its message;
anything else is logged with the request id and answered INTERNAL, with no internals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc

from inferd.errors import InferdError

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def deadline_of(context: Context) -> float | None:
    """The client's deadline as ``time.monotonic()``, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def answer(
    context: Context,
    call: Coroutine[Any, Any, T],
    request_id: str,
    on_status: Callable[[str], None] | None = None,
) -> T:
    """Await ``call``; abort ``context`` with the status of a failure.

    ``on_status`` receives the gRPC code name (``OK`` on success), e.g. to count the request.
    """
    try:
        result = await call
    except InferdError as error:
        if on_status:
            on_status(error.code.grpc_code)
        await context.abort(grpc.StatusCode[error.code.grpc_code], error.message)
    except Exception:
        log.exception("gRPC request %s failed", request_id)
        if on_status:
            on_status("INTERNAL")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error; request id {request_id}")
    if on_status:
        on_status("OK")
    return result
