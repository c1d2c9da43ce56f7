"""One Ray Serve replica: the whole inferd server (both REST APIs, batching, shedding, deadlines,
features, caches, tokens, metrics) built inside the replica from the same composition root as
``inferd serve`` (``inferd.server.Server``) and answering through the same ASGI app (``HttpApp``).

The replica loads the repository's versions before Serve marks it healthy, polls the repository
like ``inferd serve`` (so every replica converges on the same versions and labels), restores
rollouts from ``--rollout_state_dir`` as it does, follows the cluster's admin log (``admin_log``:
label moves, rollouts, loads and unloads, over REST or gRPC, sent to any replica take effect on
all), tells Serve's router which models it holds (``multiplexing``), unloads
versions idle past their ``[residency] idle_unload_s`` as ``inferd serve`` does, answers TF
Serving's and the V2 gRPC services through Serve's gRPC ingress (``grpc_ingress``), and drains on
shutdown: Serve first stops routing to it and waits for its requests, then inferd's own drain
waits for any still in flight before the models are unloaded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ray import serve

from inferd.config import ServerConfig
from inferd.ray import ingress
from inferd.ray.admin_log import Follower
from inferd.ray.cluster_metrics import ClusterMetrics, deployment_handle
from inferd.ray.deployment import ANSWERED, APP_NAME, IN_FLIGHT, LOOP_UTILIZATION
from inferd.ray.grpc_ingress import GrpcMethods, record_deadlines
from inferd.ray.multiplexing import Announcer
from inferd.server import Server

log = logging.getLogger(__name__)


IDLE_CHECK_S = 1.0
"""How often versions are checked against their ``idle_unload_s`` (as ``inferd serve`` does)."""


class InferdReplica(GrpcMethods):
    """A Serve deployment class (decorated by ``deployment.build``); its ASGI app is inferd's, its
    gRPC methods inferd's servicers."""

    async def __init__(self, config: ServerConfig) -> None:  # type: ignore[misc]  # Serve awaits it
        record_deadlines()  # Serve's gRPC contexts built here carry the client's deadline
        self._server = Server(config)
        control = self._server.control
        await control.sync()
        wait_s = config.file_system_poll_wait_seconds
        if wait_s > 0:  # versions load once two scans agree on their content (repository.py)
            await asyncio.sleep(wait_s)
            await control.sync()
        await self._server.rollouts.restore()  # as inferd serve does: a rollout resumes or rolls back
        self._announcer = Announcer(control)  # Serve's router routes by model to who holds it
        replica = _replica_id()
        self._metrics = ClusterMetrics(replica, self._server.metrics.exposition, deployment_handle(APP_NAME))
        self._admin = Follower(
            self._server, replica, lambda: {"announced": self._announcer.announced}, self._metrics.exposition
        )
        self.grpc = self._admin  # gRPC admin changes go to the log too
        await self._admin.catch_up()  # the cluster's label moves, rollouts, loads and unloads
        self._follower = asyncio.create_task(self._admin.follow())
        periods = [p for p in (wait_s, config.model_config_file_poll_wait_seconds) if p > 0]
        self._poller = asyncio.create_task(self._poll(min(periods))) if periods else None
        self._sweeper = asyncio.create_task(self._unload_idle())
        self._announcing = asyncio.create_task(self._announcer.run())
        ingress.serve_directly(self._admin)  # HTTP requests skip Serve's per-request wrapping
        self._loop_utilization = LoopUtilization()  # from here: loading the models is not load
        self._answered = self._server.metrics.answered()
        level, served = control.summary()
        log.log(level, "replica %s: %s", _replica_id(), served)

    async def _poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._server.control.poll()
            except Exception:  # a scan that fails (disk, permissions, network) is retried next time
                log.exception("repository scan failed; retrying in %.1f s", interval_s)

    async def _unload_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            self._server.manager.unload_idle()

    def __serve_build_asgi_app__(self) -> Follower:
        return self._admin

    def metrics_exposition(self) -> tuple[str, bytes]:
        """This replica's id and its own metrics (``cluster_metrics``: another replica's scrape)."""
        return self._metrics.own()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (``deployment.ScaleOnLoad``): inferd's requests in
        flight, over both APIs; since the previous call, the event loop's utilization and the
        requests answered."""
        total = self._server.metrics.answered()
        answered, self._answered = total - self._answered, total
        return {
            IN_FLIGHT: float(self._server.metrics.in_flight),
            LOOP_UTILIZATION: self._loop_utilization.read(),
            ANSWERED: float(answered),
        }

    async def __del__(self) -> None:
        """Serve calls this after it stopped routing here and waited for the replica's requests
        (``graceful_shutdown_timeout_s``); inferd's drain then waits for anything still running."""
        server: Server | None = getattr(self, "_server", None)
        if server is None:  # __init__ failed before the server existed: nothing to close
            return
        ingress.serve_directly(None)  # any late arrival goes through Serve's own handling
        for name in ("_poller", "_sweeper", "_follower", "_announcing"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
        server.manager.drain()
        try:
            await server.manager.drained(server.config.drain_timeout_s)
        finally:
            await server.close()


class LoopUtilization:
    """The share of wall time that a thread (the replica's event loop: Serve runs the replica's
    code, its HTTP server and inferd on one loop) spent on the CPU between two ``read`` calls made
    on it; 0 to 1. A saturated loop reads below 1 only while it waits for its core (shared with
    other processes) or for the GIL."""

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self._cpu_s = time.thread_time()
        self._wall_s = time.monotonic()

    def read(self) -> float:
        """The utilization since the previous call (0.0 for a call made on another thread, which
        becomes the thread measured)."""
        cpu_s, wall_s, thread = time.thread_time(), time.monotonic(), threading.get_ident()
        share = (cpu_s - self._cpu_s) / max(wall_s - self._wall_s, 1e-6) if thread == self._thread else 0.0
        self._cpu_s, self._wall_s, self._thread = cpu_s, wall_s, thread
        return min(max(share, 0.0), 1.0)


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (never in practice): the log line says so
        return "?"
