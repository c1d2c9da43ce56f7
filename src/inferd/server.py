"""The composition root: builds the object graph, runs the HTTP and gRPC servers and the
repository poller.

At start the server scans the repository, loads the initial versions, and only then opens its
ports (as TF Serving does), so a client that can connect finds the models loaded. SIGINT and
SIGTERM drain it: readiness goes false at once (V2 ready, gRPC health, every version UNLOADING in
its status) and new requests get 503 / UNAVAILABLE while the ones in flight finish, for at most
``--drain_timeout_s``; then the ports close and every model is unloaded. A second signal ends the
drain at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from inferd import collector, devices
from inferd.capture import TrafficCapture
from inferd.config import (
    BatchingParameters,
    ServerConfig,
    channel_arguments,
    read_batching_parameters_file,
    read_monitoring_config_file,
)
from inferd.control import AdminState, ModelControl
from inferd.dashboard import Dashboard, is_admin, is_public
from inferd.errors import (
    ConfigError,
    DeadlineExceeded,
    InferdError,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from inferd.features import FeatureStores
from inferd.log_limits import LogRateLimit, limit_handlers
from inferd.manager import ModelManager, Residency
from inferd.metrics import Metrics
from inferd.protocols import openapi, tfserving_rest, v2_rest
from inferd.protocols.access import Access
from inferd.protocols.deadlines import Deadlines
from inferd.protocols.decoding import LARGE_BODY_BYTES, BodyDecoder, decode, inflate
from inferd.protocols.http_connection import (
    WATCH,
    ConnectionLimits,
    RequestWatch,
    connection_class,
    raise_open_file_limit,
)
from inferd.protocols.limits import HELD, InflightBytes, RequestLimits, Reservation, hold_strings
from inferd.protocols.rest_status import JSON_HEADERS, Response, json_error
from inferd.repository import Repository
from inferd.residency import MemoryBudget, ResidencyCollector, parse_budgets
from inferd.rollout import RolloutBook, Rollouts, RolloutState
from inferd.servable import Servable, ServableFactory
from inferd.service import InferenceService
from inferd.shadow import ShadowMirror
from inferd.shared_state import SharedState
from inferd.threads import ThreadPool
from inferd.tls import TlsSettings, abort_closed_connections, tls_settings
from inferd.tracing import TRACEPARENT, Tracing
from inferd.worker_metrics import WorkerMetrics, requests_in, shadow_rows_in

if TYPE_CHECKING:
    import grpc
    from grpc_health.v1.health import aio as health_aio

    from inferd.workers import WorkerLink

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"

ANSWER_GRACE_S = 1
"""After the drain, how long answers still being sent (HTTP and gRPC) may take before they are
cancelled."""

UNLOAD_GRACE_S = 1
"""After a drain that used all of ``--drain_timeout_s``, how long unloading (and then the export
of the last traces) may still take before the server exits without it: a load in progress, a
model's ``close()`` or an OTLP receiver that hangs."""

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]


class HttpApp:
    """A bare ASGI application: checks the bearer token when one is needed, reads the body under
    a size limit and the in-flight byte budget, applies the deadline and routes ``/v1/`` to the
    TF Serving adapter and ``/v2`` to the V2 one. No framework, no access log, no per-request
    objects beyond what the adapter needs."""

    def __init__(
        self,
        service: InferenceService,
        control: ModelControl,
        config: ServerConfig,
        metrics: Metrics,
        metrics_paths: set[str],
        inflight: InflightBytes,
        rollouts: Rollouts,
        decode_pool: BodyDecoder | None = None,
        traced: bool = False,
        exposition: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self._service = service
        self._exposition = exposition
        self._traced = traced
        self._control = control
        self._rollouts = rollouts
        self._access = Access(config.api_token, config.admin_token)
        self._metrics = metrics
        self._metrics_paths = metrics_paths
        self._max_body = config.max_request_bytes
        self._max_header = config.max_header_bytes
        self._limits = RequestLimits.of(config)
        self._timeout_s = config.rest_api_timeout_in_ms / 1000
        self._deadlines = Deadlines(self._timeout_s)
        self._traffic_key = service.traffic_key_header.encode("latin-1")  # lower case, b"" for none
        self._inflight = inflight
        self._decode_pool = decode_pool
        self._cors = config.rest_api_enable_cors_support
        self._dashboard = Dashboard(service, control, metrics, rollouts) if config.dashboard else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        reservation = self._inflight.reservation()
        token = HELD.set(reservation)  # what the request's decoded strings take is held in it too
        try:
            await self._serve(scope, receive, send, reservation)
        finally:  # also when the client went away or the drain cancelled the request
            HELD.reset(token)  # an ASGI server may call the app in a task that goes on
            reservation.release()

    async def _serve(self, scope: Scope, receive: Any, send: Any, reservation: Reservation) -> None:
        request_id = self._service.request_id()
        method, path = scope["method"], scope["path"]
        if method == "HEAD":  # a GET's answer, whose body the connection leaves out (RFC 9110 9.3.2)
            method = "GET"
        metrics = self._metrics
        if self._traced:  # this request's task only: the service's span reads it
            TRACEPARENT.set(_header(scope, b"traceparent"))
        watch = scope.get("extensions", {}).get(WATCH)
        try:
            self._check_header_size(scope, watch)
            if self._cors and method == "OPTIONS":
                await self._send(watch, send, *_preflight(scope))
                return
            admin = path.startswith(v2_rest.ADMIN_PREFIX) or is_admin(method, path)
            if admin or (self._access.api_token and not is_public(method, path)):
                self._access.check(_header(scope, b"authorization"), admin)
            body = await self._read_body(scope, receive, reservation)
            if body is None:
                return  # the client went away (or was timed out) before its body arrived
            if watch is not None:
                await watch.step()
            deadline = time.monotonic() + self._timeout_s
            traffic_key = self._traffic_key
            call: Coroutine[Any, Any, Response] | None = None
            if admin and (route := _ROLLOUT.fullmatch(path)):
                call = _rollout(self._rollouts, method, route.group(1), route.group(2), body)
            elif path[:4].lower() == "/v1/":
                call = tfserving_rest.handle(
                    self._service,
                    method,
                    path,
                    body,
                    request_id,
                    self._limits,
                    deadline,
                    _header(scope, traffic_key) if traffic_key else None,
                    self._decode_pool,
                )
            elif path[:3] == "/v2":
                call = v2_rest.handle(
                    self._service,
                    self._control,
                    method,
                    path,
                    body,
                    request_id,
                    self._limits,
                    deadline,
                    self._decode_pool,
                    _header(scope, _HEADER_LENGTH),
                    _header(scope, traffic_key) if traffic_key else None,
                )
            elif self._dashboard is not None:
                call = self._dashboard.handle(method, path, body)
            if call is not None:
                answer = await self._with_deadline(call, watch, receive)
                if answer is None:
                    return  # the client went away: nobody to answer
                status, headers, payload = answer
            elif method == "GET" and path == openapi.PATH:
                status, headers, payload = 200, dict(JSON_HEADERS), openapi.document_bytes()
            elif method == "GET" and path in self._metrics_paths:
                exposed = metrics.exposition() if self._exposition is None else await self._exposition()
                status, headers, payload = 200, {"content-type": CONTENT_TYPE_LATEST}, exposed
            else:
                status, headers, payload = (
                    404,
                    {"content-type": "application/json"},
                    b'{"error": "Not found: the APIs live under /v1/models/ and /v2/"}',
                )
            if watch is not None and not admin:
                # Then the answers go out back to back. Not after an admin call, whose change is
                # made: the shutdown's cancel here would answer 503 and invite a retry.
                await watch.step()
        except InferdError as error:  # refused before an adapter saw it: token or body size
            status, headers, payload = json_error(error)
        except asyncio.CancelledError:  # the drain timed out: the server exits without the answer
            gone = Unavailable("the server shut down before the answer was ready; retry")
            status, headers, payload = json_error(gone)
        except TimeoutError:
            late = DeadlineExceeded(f"the request took longer than {self._timeout_s * 1000:.0f} ms")
            status, headers, payload = json_error(late)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, method, path)
            failed = Internal(f"internal error; request id {request_id}")
            status, headers, payload = json_error(failed)
        await self._send(watch, send, status, headers, payload)

    async def _send(
        self, watch: RequestWatch | None, send: Any, status: int, headers: Mapping[str, str], payload: bytes
    ) -> None:
        if self._cors:
            headers = {**headers, **_CORS_HEADERS}
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        # With its length given, uvicorn sends the answer whole instead of in chunks.
        raw.append((b"content-length", b"%d" % len(payload)))
        if watch is not None and watch.send_whole(status, raw, payload):
            return
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})

    async def _with_deadline(
        self, call: Coroutine[Any, Any, Response], watch: RequestWatch | None, receive: Any
    ) -> Response | None:
        """Run an adapter's answer under the request deadline.

        Returns None when the client disconnected first; the answer is then cancelled, which
        takes a queued request out of its batching queue before it is computed. inferd's own
        connections report the disconnect through the scope's ``RequestWatch`` (``watch``); under
        another ASGI server (Ray Serve's proxy) a task waits for it on ``receive``.

        Raises:
            TimeoutError: the deadline passed first.
        """
        task = asyncio.current_task()
        assert task is not None
        listener = None
        if watch is None:
            watch = RequestWatch()
            listener = asyncio.get_running_loop().create_task(_hang_up_on_disconnect(receive, watch))
        elif watch.client_gone:  # it hung up after sending its body, before this began
            call.close()
            return None
        watch.task = task
        self._deadlines.start(watch)
        try:
            return await call
        except asyncio.CancelledError:
            if (watch.hung_up or watch.expired) and task.uncancel() == 0:
                if watch.expired:
                    raise TimeoutError from None
                return None  # cancelled by the hang-up alone
            raise
        finally:
            watch.task = None
            self._deadlines.end()
            if listener is not None:
                listener.cancel()

    async def _read_body(self, scope: Scope, receive: Any, reservation: Reservation) -> bytes | None:
        """The body, its bytes held in ``reservation`` as they arrive (its ``Content-Length``
        admitted beside what the budget holds before reading); None when the client disconnected
        first.

        A body with a ``Content-Encoding`` is decompressed (``decoding.inflate``) on the decode
        thread, and held as sent and as decompressed.

        Raises:
            ResourceExhausted: over ``--max_request_bytes`` (as sent or decompressed).
            Unavailable: over the ``--max_inflight_bytes`` budget.
            InvalidArgument: an encoding other than gzip, deflate and identity, or a body that
                is not valid data of it.
        """
        encoding = None
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit():
                if int(value) > self._max_body:
                    raise self._too_large()
                reservation.admit(int(value))
            elif key == b"content-encoding" and value.strip().lower() != b"identity":
                encoding = value
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise self._too_large()
            reservation.grow_to(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                body = b"".join(chunks)
                if encoding is None or not body:  # an empty body is empty in any encoding
                    return body
                data = await decode(
                    self._decode_pool, LARGE_BODY_BYTES, inflate, body, encoding, self._max_body
                )
                reservation.grow_to(size + len(data))
                return data

    def _check_header_size(self, scope: Scope, watch: RequestWatch | None) -> None:
        """Raises ResourceExhausted when the request target and the header names and values are
        over ``--max_header_bytes`` (counted by inferd's connection as it parsed them, or here)."""
        size = None if watch is None else watch.head_bytes
        if size is None:  # the target as sent: its path, and its query after a "?"
            query = len(scope["query_string"])
            size = len(scope["raw_path"] or b"") + (query + 1 if query else 0)
            size += sum(len(key) + len(value) for key, value in scope["headers"])
        if size > self._max_header:
            raise ResourceExhausted(
                f"the request line and headers take {size} bytes, over the limit of {self._max_header} "
                "bytes (--max_header_bytes)"
            )

    def _too_large(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"the request body is larger than the limit of {self._max_body} bytes (--max_request_bytes)"
        )


async def _hang_up_on_disconnect(receive: Any, watch: RequestWatch) -> None:
    """Tell ``watch`` when the client closes the connection (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    watch.hang_up()


_ROLLOUT = re.compile(r"/v2/repository/models/([^/]+)/rollout(?:/([a-z]+))?")


async def _rollout(rollouts: Rollouts, method: str, model: str, action: str | None, body: bytes) -> Response:
    """``POST .../rollout`` starts a rollout (body: see ``Rollouts.start``); ``POST
    .../rollout/ACTION`` does ``Rollouts.command``'s other actions (``status``, ``pause``,
    ``resume``, ``promote``, ``abort``). Each answers the rollout's status."""
    if method != "POST":
        raise InvalidArgument(f"{method} is not allowed on the rollout routes; they take POST")
    return 200, dict(JSON_HEADERS), orjson.dumps(await rollouts.command(model, action or "start", body))


_HEADER_LENGTH = v2_rest.HEADER_LENGTH.encode()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


ADMIN_FOLLOW_S = 0.05
"""Under ``--workers``, how often a worker looks for admin changes made through another (a
``stat`` of one file)."""

_IDLE_CHECK_S = 1.0
"""How often versions are checked against their ``idle_unload_s``."""


class Server:
    """Owns the executors, the manager, the service and the poll loop."""

    def __init__(self, config: ServerConfig, link: WorkerLink | None = None) -> None:
        """``link``: this server is one of ``--workers N`` (see ``inferd.workers``)."""
        self.config = config
        self.link = link
        if config.batching_parameters_file and not config.enable_batching:
            raise ConfigError("--batching_parameters_file needs --enable_batching")
        self.tls = tls_settings(config)
        batching = None
        if config.enable_batching:
            batching = (
                read_batching_parameters_file(Path(config.batching_parameters_file))
                if config.batching_parameters_file
                else BatchingParameters()
            )
        self.metrics_paths = {"/metrics"} if config.enable_metrics else set()
        if config.monitoring_config_file:
            path = read_monitoring_config_file(Path(config.monitoring_config_file))
            if path:
                self.metrics_paths.add(path)
        # Always recorded (about 0.2 us a record); --enable_metrics decides whether it is served.
        self.metrics = Metrics()
        self._load_pool = ThreadPoolExecutor(config.num_load_threads, thread_name_prefix="inferd-load")
        self._infer_pool = ThreadPool(config.rest_api_num_threads, "inferd-infer")
        self._decode_pool = BodyDecoder(config.decode_processes)
        self.repository = Repository(config)
        self.feature_stores = FeatureStores()
        self.servables = ServableFactory(
            self._infer_pool, batching, config.max_in_flight, self.metrics, self.feature_stores
        )
        budgets = parse_budgets(v for v in config.memory_budget.split(",") if v.strip())
        if budgets:
            devices.return_large_blocks()  # so that an unload's memory leaves RSS (devices.py)
        residency = Residency(MemoryBudget(budgets), config.load_wait_ms / 1000)
        self.manager: ModelManager[Servable] = ModelManager(
            self._load_pool, self.servables.load, self.metrics, residency
        )
        self.metrics.registry.register(
            ResidencyCollector(residency.stats, residency.budget, self.manager.resident_bytes)
        )
        self.tracing = (
            Tracing(config.otel_endpoint, config.otel_sample_rate) if config.otel_endpoint else None
        )
        self.service = InferenceService(self.manager, self.metrics, self.tracing, config.traffic_key_header)
        self.shadows = ShadowMirror(self.manager, self.metrics)
        self.service.admitting.append(hold_strings)
        self.service.answered.append(self.shadows.offer)
        self.capture = TrafficCapture(self.manager, self.metrics)
        self.service.answered.append(self.capture.offer)
        shadows = self.shadows

        def agreement(model: str, baseline: int, canary: int) -> tuple[int, int]:
            stats = shadows.stats(model, baseline, canary)
            return stats.agreeing, stats.rows

        self.worker_metrics = (
            WorkerMetrics(link.folder, link.number, self.metrics.exposition) if link is not None else None
        )
        shared = (
            SharedState[AdminState](link.folder, "admin-state", link.number) if link is not None else None
        )
        self.control = ModelControl(self.repository, self.manager, shared)
        state_dir = Path(config.rollout_state_dir) if config.rollout_state_dir else None
        self.rollouts = Rollouts(
            self.manager,
            self.metrics,
            agreement,
            state_dir,
            SharedState[RolloutBook](link.folder, "rollouts", link.number) if link is not None else None,
            self._workers_readings if link is not None else None,
            self.control.move_label,
        )
        self.connection_limits = ConnectionLimits.of(config)
        self.inflight = InflightBytes(config.max_inflight_bytes, config.max_request_bytes)
        self._exit_by = math.inf  # set by the drain: when unloading must be over
        self._hurried = asyncio.Event()  # a second signal: unloading is not waited for either

    def http_app(self, exposition: Callable[[], Awaitable[bytes]] | None = None) -> HttpApp:
        """The REST ASGI app over this server's service, limits and decode pool (``serve`` runs it
        under uvicorn; a Ray Serve replica under Serve's proxy). ``/metrics`` answers
        ``exposition()`` when given (a Ray replica's, over every replica), else every worker's
        (``--workers``) or this process's own."""
        return HttpApp(
            self.service,
            self.control,
            self.config,
            self.metrics,
            self.metrics_paths,
            self.inflight,
            self.rollouts,
            self._decode_pool,
            traced=self.tracing is not None,
            exposition=exposition
            or (self.worker_metrics.exposition if self.worker_metrics is not None else None),
        )

    async def _poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.control.poll()
            except Exception:  # a scan that fails (disk, permissions) is retried next time
                log.exception("repository scan failed; retrying in %.1f s", interval_s)

    async def _unload_idle(self) -> None:
        """Unload versions idle past their ``[residency] idle_unload_s``, checked every second;
        and settle the garbage collector again a while after unloads (``collector``)."""
        while True:
            await asyncio.sleep(_IDLE_CHECK_S)
            self.manager.unload_idle()
            collector.settle_again(time.monotonic())

    async def _supervised(self, http: Any, request_exit: Callable[[], None]) -> None:
        """Once ``http`` listens (gRPC listens before it): answer this worker's metrics to the
        others (an error logged when that fails) and tell the supervisor; then drain and exit
        when the supervisor is gone (its end of the link closed)."""
        assert self.link is not None
        assert self.worker_metrics is not None
        while not http.started:
            await asyncio.sleep(0.01)
        try:
            await self.worker_metrics.serve()
        except OSError as exc:  # a Unix socket path is at most 107 bytes: a long TMPDIR, say
            log.error("the other workers' /metrics will leave this worker's out: %s", exc)
        self.link.ready()
        loop = asyncio.get_running_loop()
        self.link.channel.setblocking(False)
        while await loop.sock_recv(self.link.channel, 16):
            pass
        log.warning("the supervisor is gone; shutting down")
        request_exit()

    async def _follow_admin(self) -> None:
        """Apply the admin changes other workers publish, checked every ``ADMIN_FOLLOW_S``."""
        while True:
            await asyncio.sleep(ADMIN_FOLLOW_S)
            try:
                await self.control.follow()
            except Exception:
                log.exception("applying another worker's admin change failed; retrying")

    async def _follow_rollouts(self) -> None:
        """Apply the rollout changes other workers publish, and take the steps over when the
        worker running them is gone, every ``ADMIN_FOLLOW_S`` (apart from the admin changes,
        whose loads may take minutes)."""
        while True:
            await asyncio.sleep(ADMIN_FOLLOW_S)
            try:
                self.rollouts.follow()
            except Exception:
                log.exception("applying another worker's rollout change failed; retrying")

    async def _workers_readings(self, state: RolloutState) -> dict[str, Any]:
        """The counts a rollout's guards read, over every worker (``Rollouts``'s ``readings``)."""
        assert self.worker_metrics is not None
        text = await self.worker_metrics.exposition()
        return {
            "canary": requests_in(text, state.model, str(state.canary)),
            "baseline": requests_in(text, state.model, str(state.baseline)),
            "agreement": shadow_rows_in(text, state.model, state.baseline, state.canary),
        }

    def _poll_interval_s(self) -> float:
        periods = [
            self.config.file_system_poll_wait_seconds,
            self.config.model_config_file_poll_wait_seconds,
        ]
        positive = [p for p in periods if p > 0]
        return min(positive) if positive else 0.0

    async def _drain(
        self, health: health_aio.HealthServicer | None, close_connections: Callable[[], None]
    ) -> None:
        """Refuse new requests and report not ready, close the REST port's idle connections (and
        the others as they are answered), then wait for the requests in flight."""
        self._exit_by = time.monotonic() + self.config.drain_timeout_s
        self.manager.drain()
        close_connections()
        if health is not None:
            await health.enter_graceful_shutdown()
        timeout_s = self.config.drain_timeout_s
        log.info(
            "shutting down: waiting up to %.0f s for %d request(s) in flight",
            timeout_s,
            self.manager.leases(),
        )
        try:
            await self.manager.drained(timeout_s)
        finally:  # also when a second signal cancels the wait
            if abandoned := self.manager.leases():
                log.warning("drain ended with %d request(s) still in flight", abandoned)

    async def run(self) -> None:
        """Load the initial models, serve until a signal arrives, then unload everything."""
        import uvicorn

        http_server = _http_server_class(self.config.header_timeout_s)
        interval_s = self._poll_interval_s()
        # Bound (not yet listening) before the models load: a busy port fails the start at once.
        rest_socket = bind_rest_socket(self.config.host, self.config.rest_api_port, self.link is not None)
        try:
            await self.control.sync()
            if self.config.file_system_poll_wait_seconds > 0:
                # Versions are loaded once two scans agree on their content (see repository.py).
                await asyncio.sleep(self.config.file_system_poll_wait_seconds)
                await self.control.sync()
            await self.rollouts.restore()  # before the first request: a rollout resumes or rolls back
        except BaseException:
            rest_socket.close()
            raise
        collector.settle()  # the modules and initial models: no full collection walks them again
        poller = asyncio.create_task(self._poll(interval_s)) if interval_s > 0 else None
        sweeper = asyncio.create_task(self._unload_idle())
        linked: list[asyncio.Task[None]] = []
        if self.link is not None:
            linked += [
                asyncio.create_task(self._follow_admin()),
                asyncio.create_task(self._follow_rollouts()),
            ]
        connections = connection_class(self.connection_limits)
        http = http_server(
            uvicorn.Config(
                self.http_app(),
                host=self.config.host,
                port=self.config.rest_api_port,
                access_log=False,
                proxy_headers=False,
                server_header=False,
                lifespan="off",
                log_level="warning",
                http=connections,
                ws="none",
                # uvicorn declares an int but passes it to loop.call_later, which takes a float.
                timeout_keep_alive=self.config.keep_alive_timeout_s,  # type: ignore[arg-type]
                loop="none",
                timeout_graceful_shutdown=ANSWER_GRACE_S,
            )
        )
        # uvicorn configured its loggers above: bound what clients can make any of them write.
        names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
        limit_handlers((logging.getLogger(name) for name in names), LogRateLimit())
        if self.tls:  # uvicorn builds its SSL context from files; give it the one made from PEM
            http.config.load()
            http.config.ssl = self.tls.ssl_context()
        loop = asyncio.get_running_loop()
        grpc_server: grpc.aio.Server | None = None
        health: health_aio.HealthServicer | None = None
        try:
            if self.config.port or self.config.grpc_socket_path:
                grpc_server, health = await _start_grpc(
                    self.service,
                    self.control,
                    self.config,
                    self.tls,
                    self.inflight,
                    self._decode_pool,
                    self.link is not None,
                )
            listen_rest_socket(rest_socket, http.config.backlog, self.config)
            level, served = self.control.summary()
            log.log(
                level,
                "%s; listening on %s://%s:%d%s",
                served,
                "https" if self.tls else "http",
                self.config.host,
                self.config.rest_api_port,
                f" and gRPC{' (TLS)' if self.tls else ''} on {_grpc_addresses(self.config)}"
                if grpc_server
                else "",
            )

            draining: list[asyncio.Task[None]] = []

            def request_exit() -> None:
                if draining:  # a second signal: stop waiting for the requests in flight, or unloading
                    draining[0].cancel()
                    self._hurried.set()
                    return
                if poller:
                    poller.cancel()
                close = functools.partial(connections.drain, http.server_state.connections)
                draining.append(loop.create_task(self._drain(health, close)))
                draining[0].add_done_callback(lambda _: http.request_exit())

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, request_exit)
            if self.link is not None:
                linked.append(asyncio.create_task(self._supervised(http, request_exit)))
            await http.serve(sockets=[rest_socket])
        finally:
            rest_socket.close()
            for task in linked:
                task.cancel()
            if self.worker_metrics is not None:
                await self.worker_metrics.close()
            if grpc_server is not None:
                await grpc_server.stop(ANSWER_GRACE_S)
            if poller:
                poller.cancel()
            sweeper.cancel()
            await self.close(max(self._exit_by - time.monotonic(), UNLOAD_GRACE_S))

    async def close(self, timeout_s: float = math.inf) -> None:
        """End the rollouts' tasks, the shadow mirror and the capture writer (its last file), then
        unload every version, close the feature stores and stop the pools (after the drain).
        Unloading and the export of the last traces are waited for until ``timeout_s`` from now
        (the traces at least ``UNLOAD_GRACE_S``) or a second signal: a load in progress, a model's
        ``close()`` or an OTLP receiver that takes longer is left behind, so that it cannot hold
        the exit."""
        give_up = time.monotonic() + timeout_s
        await self.rollouts.close()
        await self.shadows.close()
        await asyncio.get_running_loop().run_in_executor(None, self.capture.close)
        if not await self._until(self.manager.close(), give_up):
            log.warning(
                "unloading did not end in time (a model still loading or closing); exiting without it"
            )
        await self.feature_stores.close()
        if self.tracing is not None:
            wait_s = 0 if self._hurried.is_set() else max(give_up - time.monotonic(), UNLOAD_GRACE_S)
            await asyncio.to_thread(self.tracing.close, wait_s)
        self._infer_pool.shutdown(cancel=True)
        self._decode_pool.close()
        self._load_pool.shutdown(wait=False, cancel_futures=True)

    async def _until(self, work: Coroutine[Any, Any, None], give_up: float) -> bool:
        """Await ``work`` until it ends, ``give_up`` (``time.monotonic``) passes or a second signal
        comes; whether it ended (it is cancelled otherwise). Raises what ``work`` raised."""
        task = asyncio.ensure_future(work)
        hurried = asyncio.ensure_future(self._hurried.wait())
        timeout_s = None if math.isinf(give_up) else max(give_up - time.monotonic(), 0)
        await asyncio.wait((task, hurried), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not task.done():
            task.cancel()
            return False
        task.result()
        return True


async def _start_grpc(
    service: InferenceService,
    control: ModelControl,
    config: ServerConfig,
    tls: TlsSettings | None,
    inflight: InflightBytes,
    decode_pool: BodyDecoder,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, health_aio.HealthServicer | None]:
    """Start the gRPC server on ``config.port`` (unless 0) and ``config.grpc_socket_path`` (unless
    empty; one of them is set): TF Serving's and the V2 services, the standard health service
    (every service SERVING until the drain) and server reflection, behind the token check and
    the in-flight byte budget, with the connection and stream limits of
    ``grpc_transport_options``; over TLS when ``tls`` is given; large messages parsed and
    decoded on ``decode_pool``'s thread. Health and reflection are optional: when their package
    cannot be imported, one WARNING says so and the server runs without it.

    Raises:
        ConfigError: the port cannot be bound.
    """
    import grpc

    from inferd.protocols import grpc_status, tf_profiler, tfserving_grpc, v2_grpc

    access = grpc_status.AccessInterceptor(
        Access(config.api_token, config.admin_token),
        admin_methods=(*tfserving_grpc.ADMIN_METHODS, *v2_grpc.ADMIN_METHODS),
        inflight=inflight,
    )
    options = grpc_transport_options(config, ConnectionLimits.of(config).max_connections, reuse_port)
    interceptors: list[grpc.aio.ServerInterceptor] = [access, grpc_status.DecodeInterceptor(decode_pool)]
    if config.otel_endpoint:
        from inferd.protocols.trace_context import TraceContextInterceptor

        interceptors.append(TraceContextInterceptor())
    server = grpc.aio.server(options=options, interceptors=interceptors)
    limits = RequestLimits.of(config)
    tfserving_grpc.add_to_server(
        server,
        service,
        control,
        config.max_request_bytes,
        limits,
        config.enable_serialization_as_tensor_content,
        decode_pool,
    )
    v2_grpc.add_to_server(server, service, control, limits, decode_pool)
    if config.enable_profiler:
        tf_profiler.add_to_server(server)
    services = (*tfserving_grpc.SERVICES, v2_grpc.SERVICE)
    health_servicer, health_name = await _add_health(server, services)
    profiler = (tf_profiler.SERVICE,) if config.enable_profiler else ()
    _add_reflection(server, (*services, *profiler, *health_name))
    if config.port:
        address = f"{config.host}:{config.port}"
        try:
            bound = (
                server.add_secure_port(address, tls.grpc_credentials())
                if tls
                else server.add_insecure_port(address)
            )
        except RuntimeError:
            bound = 0
        if not bound:
            raise ConfigError(f"cannot listen for gRPC on {address} (--port); is the port in use?")
    if config.grpc_socket_path:
        _bind_unix_socket(server, config.grpc_socket_path)
    await server.start()
    return server, health_servicer


_CORS_HEADERS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST, GET",
    "access-control-allow-headers": "Content-Type",
}
_ORIGIN = re.compile(r"https?://.+")


def _preflight(scope: Scope) -> tuple[int, dict[str, str], bytes]:
    """TF Serving's answer to OPTIONS with --rest_api_enable_cors_support: 200 when the request
    carries an http(s) Origin, else 400."""
    origin = _header(scope, b"origin")
    if origin is not None and _ORIGIN.fullmatch(origin):
        return 200, {"content-type": "application/json"}, b""
    error = InvalidArgument("OPTIONS request without an http(s) Origin header; CORS preflight expects one")
    return json_error(error)


def _grpc_addresses(config: ServerConfig) -> str:
    """Where gRPC listens, for the log: the port and the Unix socket that are set."""
    addresses = [f"{config.host}:{config.port}"] if config.port else []
    if config.grpc_socket_path:
        addresses.append(f"unix:{config.grpc_socket_path}")
    return " and ".join(addresses)


def _bind_unix_socket(server: Any, path: str) -> None:
    """Serve gRPC on the Unix socket ``path`` too (--grpc_socket_path), as TF Serving does:
    without TLS (the socket's file permissions guard it), replacing a stale socket file.

    Raises:
        ConfigError: the path exists and is not a socket, or cannot be bound.
    """
    socket_file = Path(path).absolute()
    if socket_file.is_socket():
        socket_file.unlink()  # left by a server that did not stop cleanly
    elif socket_file.exists():
        raise ConfigError(f"--grpc_socket_path {path}: the path exists and is not a socket")
    try:
        bound = server.add_insecure_port(f"unix:{socket_file}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise ConfigError(f"cannot listen for gRPC on the Unix socket {path} (--grpc_socket_path)")


def _optional_service_missing(what: str, package: str, exc: Exception) -> None:
    log.warning(
        "serving gRPC without %s: %s cannot be imported (%s: %s); its version may not match the "
        "installed protobuf (see docs/grpc.md)",
        what,
        package,
        type(exc).__name__,
        exc,
    )


async def _add_health(
    server: grpc.aio.Server, services: tuple[str, ...]
) -> tuple[health_aio.HealthServicer | None, tuple[str, ...]]:
    """Add the standard health service, every service SERVING; returns it and its service
    name, or (None, ()) when grpcio-health-checking cannot be imported."""
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except Exception as exc:  # ImportError, or protobuf's VersionError for another protobuf's code
        _optional_service_missing("the health service", "grpcio-health-checking", exc)
        return None, ()
    from inferd._proto import POOL

    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in (health.OVERALL_HEALTH, *services):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # Reflection answers from inferd's private pool, so it must also hold the health service's file.
    POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    return servicer, (health.SERVICE_NAME,)


def _add_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Add server reflection for ``services`` and itself, unless grpcio-reflection cannot be
    imported."""
    try:
        from grpc_reflection.v1alpha import reflection, reflection_pb2
    except Exception as exc:  # as in _add_health
        _optional_service_missing("server reflection", "grpcio-reflection", exc)
        return
    from inferd._proto import POOL

    POOL.AddSerializedFile(reflection_pb2.DESCRIPTOR.serialized_pb)
    reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), server, pool=POOL)


def bind_rest_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` for the REST API, not yet listening (uvicorn listens
    on it when it starts serving); with ``reuse_port``, one of the workers' sockets sharing it.

    Raises:
        ConfigError: the address cannot be bound (in use, not this machine's, no permission).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen for REST on {host}:{port} (--host): {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not a listening port's
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "is the port in use?" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ConfigError(f"cannot listen for REST on {host}:{port} (--rest_api_port); {reason}") from exc
    return sock


def listen_rest_socket(sock: socket.socket, backlog: int, config: ServerConfig) -> None:
    """Listen on the REST socket that ``bind_rest_socket`` bound: another server may have bound
    the port too while the models loaded (a bound socket that does not listen keeps no server
    that sets ``SO_REUSEADDR`` out) and listen first; uvloop would not report that.

    Raises:
        ConfigError: the port cannot be listened on.
    """
    try:
        sock.listen(backlog)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen for REST on {config.host}:{config.rest_api_port} (--rest_api_port); another "
            f"program took the port while the models loaded ({exc.strerror or exc})"
        ) from exc


C_INT_MAX = 2**31 - 1
"""The largest value of gRPC core's integer options."""
GRPC_MAX_CONCURRENT_STREAMS = 128
"""Calls open at once on one gRPC connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)."""
GRPC_MAX_CONNECTION_IDLE_MS = 5 * 60 * 1000
"""A gRPC connection with no call for this long is closed (GOAWAY; clients reconnect on their own)."""
GRPC_MIN_PING_INTERVAL_MS = 10_000
"""The shortest interval between a client's keep-alive pings that the server accepts."""
GRPC_MAX_PING_STRIKES = 2
"""Pings sent faster than that, without data, before the server closes the connection."""


def grpc_transport_options(
    config: ServerConfig, max_connections: int, reuse_port: bool = False
) -> list[tuple[str, int | str]]:
    """The gRPC core options that bound what one client can hold or make the server do:
    message and metadata sizes, connections, streams per connection, idle connections and
    keep-alive pings. A connection that has not finished its TLS handshake, or not acknowledged
    the server's HTTP/2 settings (which a client does at once), within ``--header_timeout_s`` is
    closed, as a REST connection that sends no head is. ``grpc.so_reuseport`` 0: a second server
    on the same port fails to start instead of sharing it; 1 (``reuse_port``) for the workers of
    ``--workers N``, whose supervisor keeps other servers off the port."""
    opening_ms = max(1, round(min(config.header_timeout_s * 1000, C_INT_MAX)))  # a C int; inf too
    # gRPC core's integer options are C ints: a larger limit is no limit (a protobuf message
    # stays under 2 GiB anyway), and would make the server fail to start with an OverflowError.
    message_bytes = min(config.max_request_bytes, C_INT_MAX)
    metadata_bytes = min(config.max_header_bytes, C_INT_MAX)
    return [
        ("grpc.max_receive_message_length", message_bytes),
        ("grpc.max_metadata_size", metadata_bytes),
        ("grpc.absolute_max_metadata_size", metadata_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_allowed_incoming_connections", min(max_connections, C_INT_MAX)),
        ("grpc.server_handshake_timeout_ms", opening_ms),
        ("grpc.http2.settings_timeout", opening_ms),
        ("grpc.max_concurrent_streams", GRPC_MAX_CONCURRENT_STREAMS),
        ("grpc.max_connection_idle_ms", GRPC_MAX_CONNECTION_IDLE_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", GRPC_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", GRPC_MAX_PING_STRIKES),
        *channel_arguments(config.grpc_channel_arguments),  # --grpc_channel_arguments: later wins
    ]


def _http_server_class(handshake_timeout_s: float) -> type:
    """uvicorn's server class, made to serve inferd's REST port; over TLS a client must finish
    its handshake within ``handshake_timeout_s`` (``--header_timeout_s``)."""
    import uvicorn

    # A C timer's range (uvloop takes milliseconds); past it, as good as never.
    handshake_s = min(handshake_timeout_s, 2**31 / 1000)

    class HttpServer(uvicorn.Server):
        """uvicorn, minus its own signal handling: it re-raises SIGTERM after shutting down, which
        would end the process with status -15; the server installs its own handlers instead."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: Any = None) -> None:
            if self.config.ssl is None:
                await super().startup(sockets)
                return
            # uvicorn gives the loop no handshake timeout, and the loop's default is 60 s: a
            # connection that never finished its handshake stayed that long whatever
            # --header_timeout_s said (the connection's own timers start after the handshake).
            loop = asyncio.get_running_loop()
            create_server = loop.create_server
            loop.create_server = functools.partial(  # type: ignore[method-assign]
                create_server, ssl_handshake_timeout=handshake_s
            )
            try:
                await super().startup(sockets)
            finally:
                del loop.create_server  # the instance attribute: the class's method again

        def request_exit(self) -> None:
            self.should_exit = True

        async def shutdown(self, sockets: Any = None) -> None:
            reaper = (
                asyncio.create_task(abort_closed_connections(self.server_state)) if self.config.ssl else None
            )
            try:
                await super().shutdown(sockets)
            finally:
                if reaper:
                    reaper.cancel()

    return HttpServer


def run(config: ServerConfig, link: WorkerLink | None = None) -> None:
    """Serve ``config`` until SIGINT or SIGTERM, on uvloop when it is installed; ``link``: as one
    of ``--workers N``."""
    raise_open_file_limit()
    server = Server(config, link)
    try:
        import uvloop
    except ImportError:
        runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    else:
        runner = uvloop.run
    # SIGINT before the signal handlers are installed (the first models still loading): the
    # interpreter's exit would wait for the load threads.
    with contextlib.suppress(KeyboardInterrupt):
        runner(server.run())
    # Everything is closed. A prediction still running (one past the drain timeout, or one whose
    # client hung up, which holds no lease) would hold the exit until it ends, since the thread
    # pool joins its threads at exit: the drain timeout is the promise, so leave without them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
