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
from inferd.ray.admin_log import AdminLog, Follower, is_change, superseded
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


async def _post(app: Follower, path: str, body: bytes, token: str = "adm") -> int:
    """POST ``body`` to ``path`` through a replica's front; the answer's status."""
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {token}".encode()), (b"content-length", b"%d" % len(body))],
        "client": ("127.0.0.1", 0),
    }
    bodies = [{"type": "http.request", "body": body, "more_body": False}]
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        if bodies:
            return bodies.pop()
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


def test_a_replica_started_after_two_rollouts_ends_where_the_others_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaying the first rollout would refuse the second (one runs), and the first, finishing
    later, would leave the label where the others no longer have it."""
    model = tmp_path / "ro"
    write_onnx_affine(model / "1", 10.0)
    write_onnx_affine(model / "2", 20.0)
    (model / "inferd.toml").write_text("version_policy = { all = true }\n[labels]\nstable = 1\n")
    config = ServerConfig(
        model_base_path=str(model), model_name="ro", file_system_poll_wait_seconds=0, admin_token="adm"
    )
    shared = _Log()
    monkeypatch.setattr(admin_log, "handle", lambda: shared)
    monkeypatch.setattr(Follower, "state", lambda self, rows: {})
    path = "/v2/repository/models/ro/rollout"

    async def rollouts() -> tuple[dict[str, int], dict[str, int]]:
        first, later = Server(config), Server(config)
        try:
            await first.control.sync()
            answering = Follower(first, "r0")
            for to in (2, 1):
                body = b'{"to": %d, "steps": [100], "step_s": 0.1}' % to
                assert await _post(answering, path, body) == 200
                await answering.catch_up()  # running
                await asyncio.sleep(0.4)
                await answering.catch_up()  # done
            await later.control.sync()
            await Follower(later, "r1").catch_up()  # a replica that starts now
            await asyncio.sleep(0.4)  # what it replayed has finished
            return first.control.labels("ro"), later.control.labels("ro")
        finally:
            await first.close()
            await later.close()

    assert asyncio.run(rollouts()) == ({"stable": 1}, {"stable": 1})


def test_only_rollout_entries_before_a_later_start_of_their_model_are_superseded() -> None:
    def post(path: str) -> dict[str, Any]:
        return {"method": "POST", "path": path, "headers": [], "body": b""}

    entries = [
        (1, post("/v2/repository/models/a/rollout")),
        (2, post("/dashboard/api/models/b/rollout/abort")),  # b has no later start
        (3, post("/v2/repository/models/a/rollout/pause")),
        (4, post("/dashboard/api/models/a/labels/stable")),  # a label move stays
        (5, post("/dashboard/api/models/a/rollout")),
        (6, post("/v2/repository/models/a/rollout/abort")),
    ]
    assert superseded(entries) == {1, 3}
    assert superseded(entries[1:2]) == set()
