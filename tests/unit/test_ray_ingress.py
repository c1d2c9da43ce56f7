"""``inferd.ray.ingress``: once a replica is built, its HTTP requests go straight to inferd's app;
Serve keeps its own routes, other scopes, and everything before and after."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from inferd.ray import ingress


@pytest.fixture
def seen() -> Iterator[list[tuple[str, str]]]:
    calls: list[tuple[str, str]] = []
    yield calls
    ingress.serve_directly(None)


def _app(name: str, seen: list[tuple[str, str]]) -> ASGIApp:
    async def call(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((name, scope["path"]))

    return call


def test_http_requests_reach_inferd_only_while_the_replica_serves_them(seen: list[tuple[str, str]]) -> None:
    [middleware] = ingress.middlewares()
    wrapped = middleware.cls(_app("serve", seen), *middleware.args, **middleware.kwargs)

    async def call(path: str, kind: str = "http") -> None:
        async def receive() -> dict[str, str]:
            return {"type": "http.disconnect"}

        async def send(message: object) -> None:
            pass

        await wrapped({"type": kind, "path": path}, receive, send)

    predict = "/v1/models/m:predict"
    asyncio.run(call(predict))  # not built yet
    ingress.serve_directly(_app("inferd", seen))
    for path in (predict, "/-/healthz", "/-/routes", "/v2/health/ready"):
        asyncio.run(call(path))
    asyncio.run(call("/ws", "websocket"))
    ingress.serve_directly(None)  # shutting down
    asyncio.run(call(predict))
    assert seen == [
        ("serve", predict),
        ("inferd", predict),
        ("serve", "/-/healthz"),
        ("serve", "/-/routes"),
        ("inferd", "/v2/health/ready"),
        ("serve", "/ws"),
        ("serve", predict),
    ]
