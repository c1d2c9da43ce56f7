"""A bounded wait while no replica runs (scaled to zero, or every replica gone).

Serve's proxy holds a request until a replica can take it, however long a replica takes to
start. In the proxy process, inferd's HTTP middleware (``ingress.middlewares``) bounds that: a
request that arrives while Serve's router knows no running replica of the inferd application,
and that has no answer after ``INFERD_SCALE_FROM_ZERO_WAIT_S`` seconds (still with no replica
running), is answered 503 with ``Retry-After`` set to the same number of seconds. Serve keeps
the request queued, so that its autoscaler still counts it and starts a replica; the replica's
answer to it is dropped. Behind HAProxy this is the fallback proxy, which HAProxy uses while no
replica is up; behind the Python proxy, every request passes it.

Only requests that are safe to run again are bounded: GET and HEAD, and the prediction POSTs
(``:predict``, ``:classify``, ``:regress``, ``/infer``). Others (model and rollout admin) wait
for a replica as in Serve, so that an action answered 503 never takes effect later.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from inferd.errors import Unavailable
from inferd.protocols.rest_status import json_error

if TYPE_CHECKING:  # starlette comes with the ray extra; inferd's CLI reads WAIT_ENV without it
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    Replicas = Callable[[Scope], int | None]
    """The running replicas Serve's router knows for the inferd application a request is routed
    to; None for a request to another application (or when Serve's router cannot be read)."""

WAIT_ENV = "INFERD_SCALE_FROM_ZERO_WAIT_S"
"""Seconds a request may wait for a first replica (the proxy's environment; 0 or unset: no
bound)."""

HELD_MAX = 256
"""Refused requests Serve keeps queued at most per proxy; past it a refused request is withdrawn
(the autoscaler already counts the held ones)."""

RETRY_SAFE_SUFFIXES = (":predict", ":classify", ":regress", "/infer")


def wait_s() -> float:
    """``INFERD_SCALE_FROM_ZERO_WAIT_S`` as seconds; 0 when unset.

    Raises:
        ValueError: not a number >= 0.
    """
    value = float(os.environ.get(WAIT_ENV) or 0)
    if not value >= 0:
        raise ValueError(f"{WAIT_ENV} must be a number of seconds >= 0, got {value}")
    return value


def retry_safe(scope: Scope) -> bool:
    """Whether running the request again (or once more after its client got 503) is harmless."""
    method = scope.get("method", "")
    path: str = scope.get("path", "")
    return method in ("GET", "HEAD") or (method == "POST" and path.endswith(RETRY_SAFE_SUFFIXES))


class ColdStartWait:
    """ASGI middleware around Serve's proxy app; see the module docstring."""

    def __init__(self, app: ASGIApp, replicas: Replicas, wait_s: float) -> None:
        self._app = app
        self._replicas = replicas
        self._wait_s = wait_s
        self._retry_after = str(max(1, math.ceil(wait_s)))
        self._held: set[asyncio.Future[None]] = set()

    @classmethod
    def around(cls, app: ASGIApp) -> ASGIApp:
        """``app`` bounded when it is Serve's proxy (Serve wraps it in its request-id middleware
        first) and ``WAIT_ENV`` is set; else ``app`` itself."""
        proxy = getattr(app, "_app", None)
        router = getattr(proxy, "proxy_router", None)
        seconds = wait_s()
        if router is None or not seconds:
            return app
        return cls(app, serve_replicas(router), seconds)

    @property
    def held(self) -> int:
        """Refused requests still queued in Serve."""
        return len(self._held)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not retry_safe(scope) or self._replicas(scope) != 0:
            await self._app(scope, receive, send)
            return
        refused = False
        started = False

        async def to_client(message: Message) -> None:
            nonlocal started
            if not refused:
                started = started or message["type"] == "http.response.start"
                await send(message)

        async def from_client() -> Message:
            message = await receive()
            if refused and message["type"] == "http.disconnect":
                # The client has its 503; Serve must not withdraw the request it holds, or its
                # autoscaler stops counting it. Cancelled when Serve finishes the request.
                await asyncio.Event().wait()
            return message

        call = asyncio.ensure_future(self._app(scope, from_client, to_client))
        try:
            await asyncio.wait({call}, timeout=self._wait_s)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if call.done() or started or self._replicas(scope):
            await call  # answered, answering, or about to be: a replica runs now
            return
        refused = True
        if len(self._held) < HELD_MAX:
            self._held.add(call)
            call.add_done_callback(self._held.discard)
        else:
            call.cancel()
        await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        message = f"no replica is running yet (scaling up from zero): retry after {self._retry_after} s"
        status, headers, body = json_error(Unavailable(message))
        headers["retry-after"] = self._retry_after
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": body})


def serve_replicas(router: Any) -> Replicas:
    """``Replicas`` read from Serve's ``ProxyRouter`` (its route table) and the router of the
    deployment handle a route leads to (Ray Serve 2.60's internals; None where they differ)."""
    from inferd.ray.deployment import APP_NAME

    def replicas(scope: Scope) -> int | None:
        match = router.match_route(scope["path"])
        if match is None:
            return None
        handle = match[1]
        if getattr(getattr(handle, "deployment_id", None), "app_name", None) != APP_NAME:
            return None
        return running_replicas(handle)

    return replicas


def running_replicas(handle: Any) -> int | None:
    """How many running replicas a Serve ``DeploymentHandle`` can route to now: 0 before it
    has routed a request; None when its router is not one this code knows."""
    wrapper = getattr(handle, "_router", None)
    if wrapper is None:
        return 0
    router = getattr(wrapper, "_asyncio_router", None)
    if router is None or not hasattr(router, "_request_router"):
        return None
    if router._request_router is None:  # the replica list reaches a router before it routes
        return len(getattr(router, "_running_replicas", None) or ())
    known = getattr(router._request_router, "curr_replicas", None)
    return None if known is None else len(known)
