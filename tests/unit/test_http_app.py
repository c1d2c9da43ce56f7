"""The REST application steps aside for the port's other requests (``RequestWatch.step``) after
reading a body and before writing an answer, except where that would cost a client its answer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from inferd.config import ServerConfig
from inferd.protocols.http_connection import WATCH, RequestWatch
from inferd.server import Server

ADMIN_TOKEN = b"admin-token"


class CountingWatch(RequestWatch):
    __slots__ = ("steps",)

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    async def step(self) -> None:
        self.steps += 1
        await super().step()


async def _request(app: Any, method: str, path: str, body: bytes) -> tuple[int, int]:
    """The answer's status and the steps the request took."""
    watch = CountingWatch()
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-length", b"%d" % len(body)), (b"authorization", b"Bearer " + ADMIN_TOKEN)],
        "extensions": {WATCH: watch},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"]), watch.steps


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "steps"),
    [
        ("POST", "/v1/models/absent:predict", b'{"instances": [1]}', 404, 2),  # answered by an adapter
        ("GET", "/nowhere", b"", 404, 2),
        ("POST", "/v2/repository/models/absent/load", b"", 404, 1),  # admin: none before the answer
        ("POST", "/v1/models/absent:predict", b"x" * 200, 413, 0),  # refused before its body was read
    ],
)
def test_steps_taken_by_a_request(
    tmp_path: Path, method: str, path: str, body: bytes, status: int, steps: int
) -> None:
    async def main() -> tuple[int, int]:
        config = ServerConfig(
            repository=str(tmp_path), rest_api_port=0, port=0, file_system_poll_wait_seconds=0,
            max_request_bytes=100, admin_token=ADMIN_TOKEN.decode(),
        )  # fmt: skip
        server = Server(config)
        await server.control.sync()
        try:
            return await _request(server.http_app(), method, path, body)
        finally:
            await server.close()

    assert asyncio.run(main()) == (status, steps)


@pytest.mark.parametrize(
    ("head_bytes", "status"),
    [
        (None, 413),  # not counted by the connection (another front end's watch): counted here
        (1_000, 413),  # counted by inferd's connection
        (100, 404),  # the connection's count is the one that holds
    ],
)
def test_the_header_limit_takes_the_connections_count_or_makes_its_own(
    tmp_path: Path, head_bytes: int | None, status: int
) -> None:
    async def main() -> int:
        config = ServerConfig(
            repository=str(tmp_path), rest_api_port=0, port=0, file_system_poll_wait_seconds=0,
            max_header_bytes=500,
        )  # fmt: skip
        server = Server(config)
        await server.control.sync()
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/nowhere",
            "raw_path": b"/nowhere",
            "query_string": b"",
            "headers": [(b"x-padding", b"a" * 1_000)],
            "extensions": {WATCH: RequestWatch(head_bytes=head_bytes)},
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        try:
            await server.http_app()(scope, receive, send)
        finally:
            await server.close()
        return int(sent[0]["status"])

    assert asyncio.run(main()) == status
