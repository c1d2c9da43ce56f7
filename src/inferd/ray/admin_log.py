"""The cluster's admin log: admin changes that the repository does not carry (label moves,
rollouts and their commands, load and unload calls over REST; TF Serving's
``HandleReloadConfigRequest`` and V2's repository load and unload over gRPC) reach one replica
through the ingress, yet must take effect on every replica. The replica that answers such a call
successfully appends it to one detached Ray actor, ``AdminLog``; every replica follows the log
(polling it every ``FOLLOW_S`` seconds) and replays the entries it did not answer itself through
its own ASGI app or gRPC servicers, in the log's order, and a replica that starts replays the
whole log before it serves. Each replica
also reports its state (versions, labels, split, rollout) to the log every ``FOLLOW_S``: what
``GET /ray/replicas`` and ``inferd ray status`` show.

An actor rather than a file: it works whether or not the nodes share a disk, and Ray keeps it
reachable from every node (its state lives in the actor's process on one node; if that node is
lost, the log starts empty and the changes it held must be sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import orjson
import ray
from google.protobuf.message import Message

from inferd.dashboard import Dashboard
from inferd.errors import InferdError
from inferd.protocols.access import Access
from inferd.protocols.rest_status import JSON_HEADERS, Response, json_error
from inferd.ray.grpc_ingress import GrpcIngress, Unparsed
from inferd.server import Server

log = logging.getLogger(__name__)

ACTOR_NAME = "inferd-admin-log"
NAMESPACE = "inferd"
FOLLOW_S = 0.5
"""How often a replica reads the log's new entries and reports its state, in seconds."""
REPORT_TTL_S = 10.0
"""A replica that has not reported for this long (removed, dead) is left out of the status."""
STATUS_PATH = "/ray/replicas"
"""``GET``: every live replica's report, by replica id (needs the API token when one is set)."""

_CHANGES = re.compile(
    r"/v2/repository/models/[^/]+/(?:load|unload|rollout(?:/(?!status$)[a-z]+)?)"
    r"|/dashboard/api/models/[^/]+/(?:labels/[^/]+|rollout(?:/(?!status$)[a-z]+)?)"
)
"""The REST paths whose ``POST`` changes what a replica serves outside the repository."""

GRPC_CHANGES = frozenset({"HandleReloadConfigRequest", "RepositoryModelLoad", "RepositoryModelUnload"})
"""The gRPC methods (TF Serving's ModelService, V2's repository extension) that change what a
replica serves outside the repository."""


_REPLAYED_HEADERS = frozenset({b"authorization", b"content-type", b"content-encoding"})
"""The headers of a change kept for its replay: the admin token, and how to read the body as
recorded (sent compressed, it is recorded compressed)."""


_ROLLOUT = re.compile(r"/(?:v2/repository|dashboard/api)/models/([^/]+)/rollout(/[a-z]+)?")
"""A rollout's start (no action) or command; its model."""


def superseded(entries: list[tuple[int, dict[str, Any]]]) -> set[int]:
    """The numbers of the rollout entries (start and commands) that come before a later start
    for the same model in ``entries``: that rollout had ended where the later start was answered
    (a start is refused while one runs), and replaying it would refuse the later start here. Its
    outcome, a moved label, is in the log as a label move (``Follower.catch_up``)."""
    last_start: dict[str, int] = {}
    rollouts: list[tuple[int, str]] = []
    for seq, entry in entries:
        match = _ROLLOUT.fullmatch(entry["path"]) if entry["method"] == "POST" else None
        if match is not None:
            rollouts.append((seq, match[1]))
            if match[2] is None:
                last_start[match[1]] = seq
    return {seq for seq, model in rollouts if seq < last_start.get(model, 0)}


def is_change(method: str, path: str) -> bool:
    """True for a REST call that every replica must replay (see ``_CHANGES``)."""
    return method == "POST" and _CHANGES.fullmatch(path) is not None


class AdminLog:
    """The log itself (a Ray actor; one per cluster, named ``ACTOR_NAME``): entries numbered
    from 1, and the replicas' latest reports."""

    def __init__(self) -> None:
        self._entries: list[dict[str, Any]] = []
        self._reports: dict[str, dict[str, Any]] = {}

    def append(self, entry: dict[str, Any]) -> int:
        """Add ``entry`` (method, path, headers, body); returns its number."""
        self._entries.append(entry)
        return len(self._entries)

    def since(self, seq: int) -> list[tuple[int, dict[str, Any]]]:
        """The entries after number ``seq``, numbered."""
        return list(enumerate(self._entries[seq:], start=seq + 1))

    def report(self, replica: str, state: dict[str, Any]) -> None:
        """Keep ``state`` as replica ``replica``'s latest report."""
        self._reports[replica] = {**state, "reported_at": time.time()}

    def reports(self) -> dict[str, dict[str, Any]]:
        """The reports of the replicas that reported in the last ``REPORT_TTL_S`` seconds."""
        now = time.time()
        return {r: s for r, s in self._reports.items() if now - s["reported_at"] <= REPORT_TTL_S}


def handle() -> Any:
    """The cluster's ``AdminLog`` actor, created (detached, no CPU) if none runs yet."""
    actor = ray.remote(num_cpus=0, max_restarts=-1)(AdminLog)
    return actor.options(
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def delete() -> None:
    """End the cluster's log (the application is gone): a later deployment starts a new one."""
    with contextlib.suppress(ValueError):  # none runs
        ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE))


class Follower:
    """One replica's side of the log: records the changes it answers, replays the others'. It is
    the replica's front: its ASGI app (``__call__``) and what answers its gRPC calls (``call``).

    Args:
        server: the replica's inferd server.
        replica: the replica's id (its key in the reports).
        extra: more of the replica's state for its report (merged into it).
        exposition: what ``/metrics`` answers (``Server.http_app``).
    """

    def __init__(
        self,
        server: Server,
        replica: str,
        extra: Callable[[], dict[str, Any]] | None = None,
        exposition: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self._extra = extra
        self._server = server
        self._replica = replica
        self._app = server.http_app(exposition)
        self._grpc = GrpcIngress(server)
        self._log = handle()
        self._seq = 0
        self._own: set[int] = set()
        self._rollouts: dict[str, str] = {}  # model -> its rollout's state at the last report
        self._access = Access(server.config.api_token, server.config.admin_token)
        self._dashboard = Dashboard(server.service, server.control, server.metrics, server.rollouts)

    async def catch_up(self) -> None:
        """Replay the entries not yet applied here (the whole log at start; a rollout a later
        start supersedes is left out: ``superseded``), then report. A rollout that a guard rolled
        back here since the last report is aborted on every replica (an ``abort`` appended to the
        log): each replica checks the guards over its own requests. One that finished here since
        the last report appends its outcome, the label move, so that a replica that starts later
        ends with the label where it is here."""
        rows = await self._dashboard.models()
        for row in rows:
            rollout = row["rollout"]
            if rollout and rollout["state"] == "done" and self._rollouts.get(row["name"]) in _UNDONE:
                path = f"/dashboard/api/models/{row['name']}/labels/{rollout['label']}"
                token = f"Bearer {self._server.config.admin_token}".encode()
                headers = [(b"authorization", token), (b"content-type", b"application/json")]
                body = orjson.dumps({"version": rollout["canary"]})
                entry = {"method": "POST", "path": path, "headers": headers, "body": body}
                self._own.add(await self._log.append.remote(entry))
            if _rolled_back_by_guard(row["rollout"], self._rollouts.get(row["name"])):
                path = f"/v2/repository/models/{row['name']}/rollout/abort"
                token = f"Bearer {self._server.config.admin_token}".encode()
                entry = {"method": "POST", "path": path, "headers": [(b"authorization", token)], "body": b""}
                self._own.add(await self._log.append.remote(entry))
                log.warning(
                    "replica %s: a guard rolled back model %s; aborting its rollout everywhere",
                    self._replica,
                    row["name"],
                )
        entries = await self._log.since.remote(self._seq)
        skipped = superseded(entries)
        for seq, entry in entries:
            if seq not in self._own and seq not in skipped:
                replay = self._replay_grpc if "rpc" in entry else self._replay
                ok, answer = await replay(entry)
                if not ok:  # e.g. a rollout command for one that already ended here
                    log.warning(
                        "replica %s: replaying %s %s answered %s",
                        self._replica,
                        entry["method"],
                        entry["path"],
                        answer,
                    )
            self._own.discard(seq)
            self._seq = seq
        rows = await self._dashboard.models()
        self._rollouts = {row["name"]: row["rollout"]["state"] for row in rows if row["rollout"]}
        await self._log.report.remote(self._replica, self.state(rows))

    async def follow(self) -> None:
        """``catch_up`` every ``FOLLOW_S`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(FOLLOW_S)
            try:
                await self.catch_up()
            except Exception:  # the actor is being restarted, or a replay failed: next time
                log.exception("replica %s: following the admin log failed", self._replica)

    def state(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """This replica's report from its dashboard ``rows``: its node, the last log entry
        applied, and per model its versions (state), labels, split and rollout state."""
        models = {
            row["name"]: {
                "versions": {str(v["version"]): v["state"] for v in row["versions"]},
                "labels": row["labels"],
                "split": row["split"],
                "rollout": None
                if row["rollout"] is None
                else {k: row["rollout"][k] for k in ("state", "baseline", "canary", "step", "label")},
            }
            for row in rows
        }
        extra = self._extra() if self._extra else {}
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "applied": self._seq,
            "models": models,
            **extra,
        }

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """The replica's ASGI app: inferd's, plus ``STATUS_PATH``, and changes appended to the log."""
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if path == STATUS_PATH:
            await _send(send, await self._status(scope, method))
            return
        if not is_change(method, path):
            return await self._app(scope, receive, send)
        status = 0

        async def watched(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        body = bytearray()

        async def recorded() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            body.extend(message.get("body", b""))
            return message

        await self._app(scope, recorded, watched)
        if 200 <= status < 300:
            headers = [(k, v) for k, v in scope["headers"] if k in _REPLAYED_HEADERS]
            entry = {"method": method, "path": path, "headers": headers, "body": bytes(body)}
            self._own.add(await self._log.append.remote(entry))

    async def call(self, method: str, request: Message | Unparsed, serve_context: Any) -> Message:
        """The replica's gRPC call ``method`` (``grpc_ingress.GrpcCaller``); one in
        ``GRPC_CHANGES`` that succeeds is appended to the log, with its authorization."""
        reply, ok = await self._grpc.answer(method, request, serve_context)
        if ok and method in GRPC_CHANGES and isinstance(request, Message):
            path = self._grpc.path(method)
            metadata = [(k, v) for k, v in serve_context.invocation_metadata() if k == "authorization"]
            entry = {
                "method": "gRPC",
                "path": path,
                "rpc": method,
                "metadata": metadata,
                "body": request.SerializeToString(),
            }
            self._own.add(await self._log.append.remote(entry))
        return reply

    async def _status(self, scope: Any, method: str) -> Response:
        try:
            self._access.check(_authorization(scope["headers"]), admin=False)
            if method != "GET":
                return 405, dict(JSON_HEADERS), b'{"error": "' + STATUS_PATH.encode() + b' takes GET"}'
            reports = await self._log.reports.remote()
            return 200, dict(JSON_HEADERS), orjson.dumps({"replicas": reports})
        except InferdError as error:
            return json_error(error)

    async def _replay_grpc(self, entry: dict[str, Any]) -> tuple[bool, str]:
        """Run a logged gRPC change through this replica's servicers; whether it ended OK, and
        its status."""
        context = _ReplayContext(entry["metadata"])
        _, ok = await self._grpc.answer(entry["rpc"], self._grpc.parse(entry["rpc"], entry["body"]), context)
        return ok, f"{context.code.name}: {context.details}"

    async def _replay(self, entry: dict[str, Any]) -> tuple[bool, str]:
        """Run a logged REST change through this replica's app; whether it succeeded (2xx), and
        its status and body."""
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": entry["method"],
            "path": entry["path"],
            "raw_path": entry["path"].encode(),
            "query_string": b"",
            "headers": [*entry["headers"], (b"content-length", b"%d" % len(entry["body"]))],
            "client": ("127.0.0.1", 0),
        }
        sent = False
        never = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": entry["body"], "more_body": False}
            await never.wait()  # no disconnect: the replay runs to its answer
            return {"type": "http.disconnect"}

        answer: dict[str, Any] = {"status": 0, "body": b""}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")

        await self._app(scope, receive, send)
        status, body = answer["status"], answer["body"]
        return 200 <= status < 300, f"{status}: {body[:300].decode('utf-8', 'replace')}"


class _ReplayContext:
    """What ``GrpcIngress.answer`` needs of Serve's gRPC context, for a replayed call: the
    logged call's metadata in, its status out."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = [tuple(item) for item in metadata]
        self.code = grpc.StatusCode.OK
        self.details = ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self._metadata)  # type: ignore[arg-type]

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: list[tuple[str, str]]) -> None:
        """Replays have no caller to send trailing metadata to."""


_UNDONE = ("running", "paused")
"""The states of a rollout that has not ended."""


def _rolled_back_by_guard(rollout: dict[str, Any] | None, before: str | None) -> bool:
    """True when ``rollout`` (a status) went from running to rolled back by a failed guard (not
    by an operator's abort, which reaches every replica through the log itself)."""
    if rollout is None or before != "running" or rollout["state"] != "rolled_back":
        return False
    last = rollout["history"][-1] if rollout["history"] else {}
    return bool(last.get("failed")) and last.get("failed") != ["aborted by an operator"]


def _authorization(headers: list[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key == b"authorization":
            return value.decode("latin-1")
    return None


async def _send(send: Any, response: Response) -> None:
    status, headers, payload = response
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", b"%d" % len(payload)))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
