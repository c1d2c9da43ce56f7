"""TF Serving's and the V2 gRPC services on Ray Serve, answered by inferd's own servicers.

Serve's gRPC ingress (HAProxy in front of a gRPC server in each replica, or Serve's Python gRPC
proxy) parses a call's request message with the service's generated code and calls the ingress
replica's method of the RPC's name (``Predict``, ``ModelInfer``, ...) with that message and a
``RayServegRPCContext``. ``GrpcMethods`` gives the replica those methods; each hands its call to
``GrpcIngress``, which does what ``inferd serve``'s gRPC gate does (the bearer token check, the
in-flight byte budget) and then runs the same servicer ``inferd serve`` runs
(``tfserving_grpc.PredictionServicer`` / ``ModelServicer``, ``v2_grpc.InferenceServicer``).

A call that fails ends with inferd's code and message: the servicer's ``abort`` sets them on
Serve's context and the method returns an empty reply, which Serve sends as the status the
context holds (Serve's documented way to end a call with a status).

What Serve's context does not carry is left out: the client's deadline (``grpc-timeout`` is not
passed on; Serve's ``request_timeout_s`` bounds a call instead) and OpenTelemetry trace context.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from inferd._proto import grpc_service_pb2, model_service_pb2, prediction_service_pb2
from inferd.errors import InferdError
from inferd.protocols import tfserving_grpc, v2_grpc
from inferd.protocols.access import Access
from inferd.protocols.limits import RequestLimits
from inferd.server import Server

SERVICER_FUNCTIONS = [
    "inferd._proto.prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server",
    "inferd._proto.model_service_pb2_grpc.add_ModelServiceServicer_to_server",
    "inferd._proto.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
]
"""Import paths of the generated ``add_*_to_server`` functions, for Serve's ``gRPCOptions``:
Serve registers the services' methods with them and routes each method to the replica."""

_SERVICES = {
    "tensorflow.serving.PredictionService": prediction_service_pb2,
    "tensorflow.serving.ModelService": model_service_pb2,
    "inference.GRPCInferenceService": grpc_service_pb2,
}


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
        return None  # Serve does not pass the client's deadline on

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
        }
        self._access = Access(config.api_token, config.admin_token)
        self._admin = frozenset((*tfserving_grpc.ADMIN_METHODS, *v2_grpc.ADMIN_METHODS))
        self._inflight = server.inflight
        self._methods: dict[str, tuple[str, Callable[[Any, Any], Awaitable[Message]], type[Message]]] = {}
        for service, module in _SERVICES.items():
            for method in module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods:
                self._methods[method.name] = (
                    f"/{service}/{method.name}",
                    getattr(servicers[service], method.name),
                    GetMessageClass(method.output_type),
                )

    async def call(self, method: str, request: Message, serve_context: Any) -> Message:
        """Answer the RPC named ``method`` (unique across the three services) with ``request``;
        a failure's status is set on ``serve_context`` and an empty reply returned."""
        path, servicer_method, reply_type = self._methods[method]
        context = _Context(serve_context)
        reservation = self._inflight.reservation()
        try:
            try:
                authorization = next(
                    (v for k, v in serve_context.invocation_metadata() if k == "authorization"), None
                )
                admin = path in self._admin
                if admin or self._access.api_token:
                    self._access.check(authorization, admin)
                reservation.grow_to(request.ByteSize())
            except InferdError as error:
                await context.abort(grpc.StatusCode[error.code.grpc_code], error.message)
            return await servicer_method(request, context)
        except _Aborted:
            return reply_type()
        finally:
            reservation.release()


class GrpcMethods:
    """The gRPC methods of the ingress replica, by RPC name, each handed to ``self.grpc``.
    Serve finds them by name and passes its context as ``grpc_context``."""

    grpc: GrpcIngress

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
