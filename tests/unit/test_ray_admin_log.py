"""Which REST calls the cluster's admin log records and replays on every replica: the admin
calls that change what a replica serves outside the repository, and no read."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from inferd.config import ServerConfig
from inferd.ray import admin_log
from inferd.ray.admin_log import AdminLog, Follower, is_change
from inferd.server import Server
from tests.models import write_onnx_affine


@pytest.mark.parametrize(
    "path",
    [
        "/v2/repository/models/m/load",
        "/v2/repository/models/m/unload",
        "/v2/repository/models/m/rollout",
        "/v2/repository/models/m/rollout/pause",
        "/v2/repository/models/m/rollout/abort",
        "/dashboard/api/models/m/labels/stable",
        "/dashboard/api/models/m/rollout",
        "/dashboard/api/models/m/rollout/promote",
    ],
)
def test_admin_changes_are_replayed(path: str) -> None:
    assert is_change("POST", path)
    assert not is_change("GET", path)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/repository/index",
        "/v2/repository/models/m/rollout/status",
        "/dashboard/api/models/m/rollout/status",
        "/dashboard/api/models",
        "/v1/models/m:predict",
        "/v2/models/m/infer",
        "/v2/repository/models/m/load/extra",
    ],
)
def test_reads_and_predictions_are_not(path: str) -> None:
    assert not is_change("POST", path)


class _Remote:
    """An actor method as the follower calls it: ``.remote(...)``, awaited."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method

    async def remote(self, *args: Any) -> Any:
        return self._method(*args)


class _Log:
    """The ``AdminLog`` actor, in this process."""

    def __init__(self) -> None:
        log = AdminLog()
        self.append, self.since, self.report = _Remote(log.append), _Remote(log.since), _Remote(log.report)


def test_a_compressed_change_replays_on_the_other_replicas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change is recorded with its ``Content-Encoding``, so that the other replicas decode its
    body as the replica that answered it did."""
    write_onnx_affine(tmp_path / "affine" / "1", 2.0)
    config = ServerConfig(
        model_base_path=str(tmp_path / "affine"),
        model_name="affine",
        file_system_poll_wait_seconds=0,
        admin_token="adm",
    )
    shared = _Log()
    monkeypatch.setattr(admin_log, "handle", lambda: shared)
    monkeypatch.setattr(Follower, "state", lambda self, rows: {})  # no Ray node to name

    async def move_on_one() -> tuple[dict[str, int], dict[str, int]]:
        servers = [Server(config), Server(config)]
        try:
            for server in servers:
                await server.control.sync()
            answering, other = (Follower(server, f"r{i}") for i, server in enumerate(servers))
            body = gzip.compress(b'{"version": 1}')
            headers = [(b"authorization", b"Bearer adm"), (b"content-encoding", b"gzip")]
            headers.append((b"content-length", b"%d" % len(body)))
            scope = {
                "type": "http",
                "http_version": "1.1",
                "method": "POST",
                "path": "/dashboard/api/models/affine/labels/stable",
                "raw_path": b"/dashboard/api/models/affine/labels/stable",
                "query_string": b"",
                "headers": headers,
                "client": ("127.0.0.1", 0),
            }
            sent: list[dict[str, Any]] = []
            bodies = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if bodies:
                    return bodies.pop()
                await asyncio.Event().wait()  # the client stays connected
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await answering(scope, receive, send)
            assert sent[0]["status"] == 200
            await other.catch_up()
            return servers[0].control.labels("affine"), servers[1].control.labels("affine")
        finally:
            for server in servers:
                await server.close()

    assert asyncio.run(move_on_one()) == ({"stable": 1}, {"stable": 1})
