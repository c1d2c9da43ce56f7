"""The gRPC port: grpcio's threaded server in front of inferd's event loop.

Each unary call of inferd's services (TF Serving's ``PredictionService`` and ``ModelService``,
V2's ``GRPCInferenceService``) arrives on one of the server's threads, which

- has its bearer token checked before the request message is read (``AccessInterceptor``);
- holds the message's bytes in the in-flight budget (UNAVAILABLE when it cannot), then parses it
  (INVALID_ARGUMENT when it does not parse);
- hands the servicer's coroutine to the event loop, waits for it and writes the reply;
- cancels the coroutine when the call ends first (the client cancels, disconnects, or its
  deadline passes).

The standard health service (a ``Watch`` stream holds no thread once it has answered) and server
reflection run on the threads alone. grpcio's threaded server measured 1.5-1.7x the calls per
core of ``grpc.aio`` (``bench/grpc_floor.py``; see docs/performance.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from inferd._proto import POOL, grpc_service_pb2, model_service_pb2, prediction_service_pb2
from inferd.config import ServerConfig, channel_arguments
from inferd.control import ModelControl
from inferd.errors import ConfigError, InferdError, encodable
from inferd.protocols import tfserving_grpc, v2_grpc
from inferd.protocols.access import Access
from inferd.protocols.grpc_status import Aborted, AccessInterceptor, Context
from inferd.protocols.http_connection import ConnectionLimits
from inferd.protocols.limits import InflightBytes, RequestLimits
from inferd.service import InferenceService
from inferd.tracing import TRACEPARENT

if TYPE_CHECKING:
    from grpc_health.v1.health import HealthServicer

log = logging.getLogger(__name__)

MAX_CONCURRENT_STREAMS = 128
"""Calls open at once on one gRPC connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)."""
MAX_CONNECTION_IDLE_MS = 5 * 60 * 1000
"""A gRPC connection with no call for this long is closed (GOAWAY; clients reconnect on their own)."""
MIN_PING_INTERVAL_MS = 10_000
"""The shortest interval between a client's keep-alive pings that the server accepts."""
MAX_PING_STRIKES = 2
"""Pings sent faster than that, without data, before the server closes the connection."""


def transport_options(
    config: ServerConfig, max_connections: int, reuse_port: bool = False
) -> list[tuple[str, int | str]]:
    """The gRPC core options that bound what one client can hold or make the server do:
    message and metadata sizes, connections, streams per connection, idle connections and
    keep-alive pings. ``grpc.so_reuseport`` 0: a second server on the same port fails to start
    instead of sharing it; 1 (``reuse_port``) for the workers of ``--workers N``, whose
    supervisor keeps other servers off the port."""
    return [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_metadata_size", config.max_header_bytes),
        ("grpc.absolute_max_metadata_size", config.max_header_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        *channel_arguments(config.grpc_channel_arguments),  # --grpc_channel_arguments: later wins
    ]


_NO_DEADLINE_S = 1e9
"""grpcio's threaded server gives a call without a deadline about 9.2e18 s: more than this is none."""


class LoopContext:
    """A call's ``Context`` for its servicer on the event loop. It holds what the call's thread
    read (metadata, deadline) and what the servicer leaves for the thread to send (trailers);
    ``abort`` raises ``Aborted``, which the thread turns into the call's status."""

    __slots__ = ("_deadline", "_metadata", "trailers")

    def __init__(self, metadata: Sequence[tuple[str, str | bytes]], remaining: float) -> None:
        self._metadata = metadata
        self._deadline = None if remaining > _NO_DEADLINE_S else time.monotonic() + remaining
        self.trailers: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailers = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise Aborted(code, details)


Servicer = Callable[[Any, Context], Coroutine[Any, Any, Message]]


class _Bridge:
    """Runs unary calls' servicer coroutines on ``loop`` from the server's threads (see the
    module's docstring). ``traced``: read each call's ``traceparent`` for its span."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inflight: InflightBytes, traced: bool) -> None:
        self._loop = loop
        self._inflight = inflight
        self._traced = traced

    def handler(self, path: str, servicer: Servicer, request: type[Message], reply: type[Message]) -> Any:
        """The handler of the RPC at ``path`` (``/SERVICE/METHOD``) answered by ``servicer``."""
        parse = request.FromString

        def behaviour(raw: bytes, context: grpc.ServicerContext) -> Message:
            if not context.is_active():  # it waited for a thread past its deadline, or was cancelled
                context.abort(grpc.StatusCode.CANCELLED, "the call ended before a thread took it")
            reservation = self._inflight.reservation()
            try:
                try:
                    reservation.grow_to(len(raw))
                except InferdError as error:
                    context.abort(grpc.StatusCode[error.code.grpc_code], error.message)
                try:
                    message = parse(raw)
                except Exception as exc:  # protobuf's DecodeError, or a subclass of it
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        encodable(f"the request is not a valid {path} message: {exc}"),
                    )
                return self._run(path, servicer, message, context)
            finally:
                reservation.release()

        return grpc.unary_unary_rpc_method_handler(behaviour, None, reply.SerializeToString)

    def _run(self, path: str, servicer: Servicer, message: Message, context: grpc.ServicerContext) -> Message:
        """``servicer``'s answer to ``message``, run on the loop; a call that ends first cancels it."""
        metadata = context.invocation_metadata()
        loop_context = LoopContext(metadata, context.time_remaining())
        traceparent = (
            next((str(v) for k, v in metadata if k == "traceparent"), None) if self._traced else None
        )
        try:
            future = asyncio.run_coroutine_threadsafe(
                _serve(servicer, message, loop_context, traceparent), self._loop
            )
        except RuntimeError:  # the loop is closed: the process is ending
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry")

        def cancel() -> None:
            future.cancel()

        if not context.add_callback(cancel):
            cancel()  # the call ended while it was handed over
        try:
            reply = future.result()
        except Aborted as aborted:
            context.abort(aborted.code, aborted.details)
        except concurrent.futures.CancelledError:
            log.debug("gRPC call to %s ended before its answer (cancelled, or past its deadline)", path)
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
        if loop_context.trailers:
            context.set_trailing_metadata(loop_context.trailers)
        return reply


async def _serve(servicer: Servicer, message: Message, context: Context, traceparent: str | None) -> Message:
    if traceparent is not None:
        TRACEPARENT.set(traceparent)  # this call's task only
    return await servicer(message, context)


class GrpcPort:
    """The gRPC server of ``inferd serve`` on ``config.port`` (and ``--grpc_socket_path``):
    TF Serving's and the V2 services, the standard health service (every service SERVING until
    the drain) and server reflection, behind the token check and the in-flight byte budget, with
    the limits of ``transport_options``; over TLS with ``credentials`` when given. Health and
    reflection are optional: when their package cannot be imported, one WARNING says so and the
    port serves without it. ``config.grpc_max_threads`` threads take the calls: a call that finds
    them all busy is refused at once with RESOURCE_EXHAUSTED, as TF Serving refuses when its
    threads are exhausted (a health ``Watch`` stream counts only until its first answer).

    Raises:
        ConfigError: the port or the socket cannot be bound.
    """

    def __init__(
        self,
        service: InferenceService,
        control: ModelControl,
        config: ServerConfig,
        credentials: grpc.ServerCredentials | None,
        inflight: InflightBytes,
        reuse_port: bool = False,
    ) -> None:
        access = AccessInterceptor(
            Access(config.api_token, config.admin_token),
            admin_methods=(*tfserving_grpc.ADMIN_METHODS, *v2_grpc.ADMIN_METHODS),
        )
        options = transport_options(config, ConnectionLimits.of(config).max_connections, reuse_port)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            config.grpc_max_threads, thread_name_prefix="inferd-grpc"
        )
        self._server = grpc.server(
            self._threads,
            interceptors=[access],
            options=options,
            maximum_concurrent_rpcs=config.grpc_max_threads,
        )
        bridge = _Bridge(asyncio.get_running_loop(), inflight, bool(config.otel_endpoint))
        limits = RequestLimits.of(config)
        servicers = (
            (
                prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"],
                tfserving_grpc.PredictionServicer(
                    service,
                    config.max_request_bytes,
                    limits,
                    config.enable_serialization_as_tensor_content,
                ),
            ),
            (
                model_service_pb2.DESCRIPTOR.services_by_name["ModelService"],
                tfserving_grpc.ModelServicer(service, control),
            ),
            (
                grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                v2_grpc.InferenceServicer(service, control, limits),
            ),
        )
        for descriptor, servicer in servicers:
            self._add(bridge, descriptor, servicer)
        names = tuple(descriptor.full_name for descriptor, _ in servicers)
        self._health = _add_health(self._server, names)
        _add_reflection(self._server, (*names, *(() if self._health is None else (_HEALTH,))))
        try:
            self._bind(config, credentials)
            self._server.start()
        except BaseException:
            self._threads.shutdown(wait=False)
            raise

    def _add(self, bridge: _Bridge, descriptor: ServiceDescriptor, servicer: Any) -> None:
        """Serve the service's methods (all unary) with ``servicer``'s coroutines of their names."""
        name, methods = descriptor.full_name, descriptor.methods
        handlers = {
            method.name: bridge.handler(
                f"/{name}/{method.name}",
                getattr(servicer, method.name),
                GetMessageClass(method.input_type),
                GetMessageClass(method.output_type),
            )
            for method in methods
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        self._server.add_registered_method_handlers(name, handlers)

    def _bind(self, config: ServerConfig, credentials: grpc.ServerCredentials | None) -> None:
        address = f"{config.host}:{config.port}"
        try:
            bound = (
                self._server.add_secure_port(address, credentials)
                if credentials
                else self._server.add_insecure_port(address)
            )
        except RuntimeError:
            bound = 0
        if not bound:
            raise ConfigError(f"cannot listen for gRPC on {address} (--port); is the port in use?")
        if config.grpc_socket_path:
            _bind_unix_socket(self._server, config.grpc_socket_path)

    def enter_graceful_shutdown(self) -> None:
        """Report every service NOT_SERVING from now on (the drain has begun)."""
        if self._health is not None:
            self._health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give those in flight ``grace_s`` seconds, then cancel them and stop
        the threads."""
        stopped = self._server.stop(grace_s)
        await asyncio.to_thread(stopped.wait)
        self._threads.shutdown(wait=False, cancel_futures=True)


_HEALTH = "grpc.health.v1.Health"


def _bind_unix_socket(server: grpc.Server, path: str) -> None:
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


def _add_health(server: grpc.Server, services: tuple[str, ...]) -> HealthServicer | None:
    """Add the standard health service, every service SERVING; None when grpcio-health-checking
    cannot be imported."""
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except Exception as exc:  # ImportError, or protobuf's VersionError for another protobuf's code
        _optional_service_missing("the health service", "grpcio-health-checking", exc)
        return None
    servicer = health.HealthServicer()  # its Watch streams wait for changes without a thread
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in (health.OVERALL_HEALTH, *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # Reflection answers from inferd's private pool, so it must also hold the health service's file.
    POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    return servicer


def _add_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Add server reflection for ``services`` and itself, unless grpcio-reflection cannot be
    imported."""
    try:
        from grpc_reflection.v1alpha import reflection, reflection_pb2
    except Exception as exc:  # as in _add_health
        _optional_service_missing("server reflection", "grpcio-reflection", exc)
        return
    POOL.AddSerializedFile(reflection_pb2.DESCRIPTOR.serialized_pb)
    reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), server, pool=POOL)
