"""The shortest HTTP path into a replica: Serve's HTTP server hands requests to inferd's ASGI app.

Behind HAProxy, each replica runs its own HTTP server (Serve's direct ingress), and Serve wraps
every request in its own bookkeeping before the app sees it: request metadata and ids, a task
watching for disconnects, its ongoing-request count, access log and metrics. Measured on one
replica (docs/benchmarks.md), that wrapping cost about as much CPU as the whole of inferd's own
request. inferd does each of those jobs itself (deadlines, disconnects, ``--max_in_flight``
shedding, ``/metrics``), so once the replica is built its HTTP requests skip Serve's wrapping.

Serve installs this as an HTTP middleware (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, set in
the replicas' environment by ``deployment.REPLICA_ENV``). Serve's own routes (``/-/healthz``,
``/-/routes``), non-HTTP scopes, and requests that arrive before the replica is built or once
inferd's destructor has begun still go through Serve. Serve's autoscaler no longer sees the
others as ongoing, so it scales on inferd's own signals instead (``deployment.ScaleOnLoad``).

The same middleware runs in Serve's proxies (``deployment.PROXY_ENV``), where it bounds how long
a request waits while no replica runs (``cold_start``).
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from inferd.ray.cold_start import ColdStartWait

SERVE_ROUTES = frozenset({"/-/healthz", "/-/routes"})
"""Paths that Serve answers itself in every replica."""

_app: ASGIApp | None = None


def serve_directly(app: ASGIApp | None) -> None:
    """From now on, send this process's HTTP requests to ``app`` (None: back through Serve)."""
    global _app
    _app = app


def middlewares() -> list[Middleware]:
    """Serve's HTTP middleware callback (an import path in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(DirectIngress)]


class DirectIngress:
    """Wraps Serve's ASGI entry point (a replica's, or a proxy's); see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self._serve = ColdStartWait.around(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = _app
        if app is None or scope["type"] != "http" or scope["path"] in SERVE_ROUTES:
            await self._serve(scope, receive, send)
        else:
            await app(scope, receive, send)
