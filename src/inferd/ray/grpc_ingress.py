"""TF Serving's and the V2 gRPC services on Ray Serve, answered by inferd's own servicers.

Serve's gRPC ingress (HAProxy in front of a gRPC server in each replica, or Serve's Python gRPC
proxy) parses a call's request message with the service's generated code and calls the ingress
replica's method of the RPC's name (``Predict``, ``ModelInfer``, ...) with that message and a
``RayServegRPCContext``. ``GrpcMethods`` gives the replica those methods; each hands its call to
``GrpcIngress``, which does what ``inferd serve``'s gRPC gate does (the bearer token check, the
message size limit, ``--max_request_bytes``, which Serve's gRPC server does not apply, the
in-flight byte budget) and then runs the same servicer ``inferd serve`` runs
(``tfserving_grpc.PredictionServicer`` / ``ModelServicer``, ``v2_grpc.InferenceServicer``), or
the standard health service's ``Check`` (``HealthServicer``).

A call that fails ends with inferd's code and message: the servicer's ``abort`` sets them on
Serve's context and the method returns an empty reply, which Serve sends as the status the
context holds (Serve's documented way to end a call with a status).

The services are registered with ``SERVICER_FUNCTIONS``, inferd's own ``add_*`` functions: the
same methods as the generated ones, but a request message that does not parse becomes an
``Unparsed`` value instead of an exception in grpc's deserializer (which Serve answers UNKNOWN),
so the call answers INVALID_ARGUMENT as ``inferd serve`` does.

Serve's context does not carry the client's deadline (``grpc-timeout``); ``record_deadlines``
(called in the replica) makes Serve's context note it when Serve builds one, which it does in
the replica with HAProxy's direct ingress. With Serve's Python proxy the context is built in the
proxy and no deadline reaches inferd (Serve's ``request_timeout_s`` bounds a call instead).
OpenTelemetry trace context is not carried either.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2

from inferd._proto import grpc_service_pb2, model_service_pb2, prediction_service_pb2
from inferd.errors import InferdError, encodable
from inferd.protocols import tfserving_grpc, v2_grpc
from inferd.protocols.access import Access
from inferd.protocols.limits import HELD, RequestLimits
from inferd.server import Server

SERVICER_FUNCTIONS = [
    "inferd.ray.grpc_ingress.add_prediction_service",
    "inferd.ray.grpc_ingress.add_model_service",
    "inferd.ray.grpc_ingress.add_inference_service",
    "inferd.ray.grpc_ingress.add_health_service",
]
"""Import paths of the ``add_*`` functions, for Serve's ``gRPCOptions``: Serve registers the
services' methods with them and routes each method to the replica."""

_SERVICES = {
    "tensorflow.serving.PredictionService": prediction_service_pb2,
    "tensorflow.serving.ModelService": model_service_pb2,
    "inference.GRPCInferenceService": grpc_service_pb2,
    "grpc.health.v1.Health": health_pb2,
}


def _unary_methods(service: str) -> list[Any]:
    """The method descriptors of ``service``'s unary RPCs (Health's streaming ``Watch`` is not
    served on Ray: Serve would call it as a unary method)."""
    methods = _SERVICES[service].DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods
    return [m for m in methods if not m.client_streaming and not m.server_streaming]


class HealthServicer:
    """The standard health service's ``Check`` on a replica: a replica that Serve routes to
    serves, so ``""`` and inferd's services are SERVING and another name is NOT_FOUND, as
    ``inferd serve`` answers before its drain (Serve stops routing to a replica before it drains)."""

    SERVING = frozenset({"", *(name for name in _SERVICES if name != "grpc.health.v1.Health")})

    async def Check(self, request: Message, context: Any) -> Message:
        service = getattr(request, "service", "")
        if service not in self.SERVING:
            await context.abort(grpc.StatusCode.NOT_FOUND)  # no details, as grpc's own servicer
        serving: Message = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        return serving


@dataclass(frozen=True)
class Unparsed:
    """A request message that did not parse: what the call receives instead of the message."""

    method: str
    """The RPC's full path, ``/SERVICE/METHOD``."""
    error: str


class _Parser:
    """A request deserializer that returns ``Unparsed`` rather than raising."""

    def __init__(self, message: type[Message], method: str) -> None:
        self._message = message
        self._method = method

    def __call__(self, data: bytes) -> Message | Unparsed:
        try:
            return self._message.FromString(data)
        except Exception as exc:  # protobuf's DecodeError, or a subclass of it
            return Unparsed(self._method, str(exc))


def _add_service(service: str, servicer: Any, server: Any) -> None:
    """Register ``service``'s unary methods (all of inferd's) on ``server`` as the generated
    ``add_*_to_server`` does, with ``_Parser`` as each method's request deserializer."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_Parser(GetMessageClass(method.input_type), f"/{service}/{method.name}"),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
        for method in _unary_methods(service)
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_prediction_service(servicer: Any, server: Any) -> None:
    """TF Serving's ``PredictionService`` (for ``SERVICER_FUNCTIONS``)."""
    _add_service("tensorflow.serving.PredictionService", servicer, server)


def add_model_service(servicer: Any, server: Any) -> None:
    """TF Serving's ``ModelService`` (for ``SERVICER_FUNCTIONS``)."""
    _add_service("tensorflow.serving.ModelService", servicer, server)


def add_inference_service(servicer: Any, server: Any) -> None:
    """V2's ``GRPCInferenceService`` (for ``SERVICER_FUNCTIONS``)."""
    _add_service("inference.GRPCInferenceService", servicer, server)


def add_health_service(servicer: Any, server: Any) -> None:
    """The standard health service, ``Check`` only (for ``SERVICER_FUNCTIONS``)."""
    _add_service("grpc.health.v1.Health", servicer, server)


_DEADLINE = "_inferd_deadline"
"""The attribute of Serve's context that ``record_deadlines`` sets: ``time.monotonic()`` at the
client's deadline, or None."""


def record_deadlines() -> None:
    """Make Ray Serve's gRPC context (``RayServegRPCContext``, which keeps no deadline) note the
    client's deadline from the grpc context it is built from. Idempotent; for this process only."""
    from ray.serve.grpc_util import RayServegRPCContext

    built = RayServegRPCContext.__init__
    if getattr(built, "records_deadline", False):
        return

    def init(self: Any, grpc_context: Any) -> None:
        built(self, grpc_context)
        try:
            remaining = grpc_context.time_remaining()
        except Exception:  # a context without one: no deadline
            remaining = None
        setattr(self, _DEADLINE, None if remaining is None else time.monotonic() + remaining)

    init.records_deadline = True  # type: ignore[attr-defined]
    RayServegRPCContext.__init__ = init  # type: ignore[method-assign]


class _Aborted(Exception):
    """Raised by ``_Context.abort`` to end a servicer's call; its status is on Serve's context."""


class _Context:
    """The part of ``grpc.aio.ServicerContext`` inferd's servicers use, over Serve's context."""

    def __init__(self, serve_context: Any) -> None:
        self._serve = serve_context

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        metadata: Sequence[tuple[str, str]] = self._serve.invocation_metadata()
        return metadata

    def time_remaining(self) -> float | None:
        deadline: float | None = getattr(self._serve, _DEADLINE, None)  # see record_deadlines
        return None if deadline is None else deadline - time.monotonic()

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._serve.set_trailing_metadata(list(metadata))

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        self._serve.set_code(code)
        self._serve.set_details(details)
        raise _Aborted(details)


class GrpcIngress:
    """Runs one gRPC call through inferd's gate and servicers, inside a Serve replica.

    Args:
        server: the replica's inferd server (its service, control, limits and byte budget).
    """

    def __init__(self, server: Server) -> None:
        config = server.config
        limits = RequestLimits.of(config)
        servicers = {
            "tensorflow.serving.PredictionService": tfserving_grpc.PredictionServicer(
                server.service,
                config.max_request_bytes,
                limits,
                config.enable_serialization_as_tensor_content,
            ),
            "tensorflow.serving.ModelService": tfserving_grpc.ModelServicer(server.service, server.control),
            "inference.GRPCInferenceService": v2_grpc.InferenceServicer(
                server.service, server.control, limits
            ),
            "grpc.health.v1.Health": HealthServicer(),
        }
        self._access = Access(config.api_token, config.admin_token)
        self._max_message = config.max_request_bytes
        self._admin = frozenset((*tfserving_grpc.ADMIN_METHODS, *v2_grpc.ADMIN_METHODS))
        self._inflight = server.inflight
        self._methods: dict[
            str, tuple[str, Callable[[Any, Any], Awaitable[Message]], type[Message], type[Message]]
        ] = {}
        for service in _SERVICES:
            for method in _unary_methods(service):
                self._methods[method.name] = (
                    f"/{service}/{method.name}",
                    getattr(servicers[service], method.name),
                    GetMessageClass(method.output_type),
                    GetMessageClass(method.input_type),
                )

    def path(self, method: str) -> str:
        """The full path, ``/SERVICE/METHOD``, of the RPC named ``method``."""
        return self._methods[method][0]

    def parse(self, method: str, data: bytes) -> Message | Unparsed:
        """``data`` as the request message of the RPC named ``method``, or ``Unparsed``."""
        path, _, _, request_type = self._methods[method]
        return _Parser(request_type, path)(data)

    async def call(self, method: str, request: Message | Unparsed, serve_context: Any) -> Message:
        """Answer the RPC named ``method`` (unique across the three services) with ``request``;
        a failure's status is set on ``serve_context`` and an empty reply returned (a request that
        did not parse: INVALID_ARGUMENT; one over ``--max_request_bytes``: RESOURCE_EXHAUSTED, as
        grpc's own limit answers on ``inferd serve``'s port)."""
        reply, _ = await self.answer(method, request, serve_context)
        return reply

    async def answer(
        self, method: str, request: Message | Unparsed, serve_context: Any
    ) -> tuple[Message, bool]:
        """``call``'s reply, and whether the call succeeded (ended OK)."""
        path, servicer_method, reply_type, _ = self._methods[method]
        context = _Context(serve_context)
        reservation = self._inflight.reservation()
        token = HELD.set(reservation)  # what the call's decoded strings take is held in it too
        try:
            try:
                authorization = next(
                    (v for k, v in serve_context.invocation_metadata() if k == "authorization"), None
                )
                admin = path in self._admin
                if admin or self._access.api_token:
                    self._access.check(authorization, admin)
                if isinstance(request, Unparsed):
                    message = f"the request is not a valid {request.method} message: {request.error}"
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, encodable(message))
                size = request.ByteSize()
                if size > self._max_message:  # Serve's gRPC server takes messages up to 2 GiB
                    message = f"SERVER: Received message larger than max ({size} vs. {self._max_message})"
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                reservation.grow_to(size)
            except InferdError as error:
                await context.abort(grpc.StatusCode[error.code.grpc_code], error.message)
            return await servicer_method(request, context), True
        except _Aborted:
            return reply_type(), False
        finally:
            HELD.reset(token)
            reservation.release()


class GrpcCaller(Protocol):
    """What answers the replica's gRPC methods: ``GrpcIngress``, or the admin log's ``Follower``
    in front of it (which also records the calls that change what a replica serves)."""

    async def call(self, method: str, request: Message | Unparsed, serve_context: Any) -> Message:
        """See ``GrpcIngress.call``."""


class GrpcMethods:
    """The gRPC methods of the ingress replica, by RPC name, each handed to ``self.grpc``.
    Serve finds them by name and passes its context as ``grpc_context``."""

    grpc: GrpcCaller

    # tensorflow.serving.PredictionService
    async def Predict(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("Predict", request, grpc_context)

    async def Classify(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("Classify", request, grpc_context)

    async def Regress(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("Regress", request, grpc_context)

    async def MultiInference(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("MultiInference", request, grpc_context)

    async def GetModelMetadata(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("GetModelMetadata", request, grpc_context)

    # tensorflow.serving.ModelService
    async def GetModelStatus(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("GetModelStatus", request, grpc_context)

    async def HandleReloadConfigRequest(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("HandleReloadConfigRequest", request, grpc_context)

    # inference.GRPCInferenceService
    async def ServerLive(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("ServerLive", request, grpc_context)

    async def ServerReady(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("ServerReady", request, grpc_context)

    async def ModelReady(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("ModelReady", request, grpc_context)

    async def ServerMetadata(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("ServerMetadata", request, grpc_context)

    async def ModelMetadata(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("ModelMetadata", request, grpc_context)

    async def ModelInfer(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("ModelInfer", request, grpc_context)

    async def ModelConfig(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("ModelConfig", request, grpc_context)

    async def ModelStatistics(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("ModelStatistics", request, grpc_context)

    async def RepositoryIndex(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("RepositoryIndex", request, grpc_context)

    async def RepositoryModelLoad(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("RepositoryModelLoad", request, grpc_context)

    async def RepositoryModelUnload(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("RepositoryModelUnload", request, grpc_context)

    # grpc.health.v1.Health
    async def Check(self, request: Message, grpc_context: Any) -> Message:
        return await self.grpc.call("Check", request, grpc_context)
