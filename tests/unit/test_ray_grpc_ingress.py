"""The gRPC calls a Ray Serve replica receives go through inferd's gate (bearer tokens, the
in-flight byte budget) and servicers, and end with inferd's status on Serve's context. A real
inferd server and real messages; Serve's context is stood in for by ``ServeContext``, which has
the part of ``ray.serve.grpc_util.RayServegRPCContext`` the replica uses (the Ray cluster test,
``tests/e2e/test_ray.py``, runs the real one)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc

from inferd._proto import grpc_service_pb2 as v2
from inferd._proto import model_service_pb2 as mm
from inferd._proto import prediction_service_pb2 as ps
from inferd.config import ServerConfig
from inferd.ray.grpc_ingress import GrpcIngress, GrpcMethods, Unparsed, add_prediction_service
from inferd.server import Server
from tests.models import write_onnx_affine, write_python_model


class ServeContext:
    def __init__(self, authorization: str | None = None) -> None:
        self.metadata = [("authorization", authorization)] if authorization else []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: list[tuple[str, str]] = []

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: list[tuple[str, str]]) -> None:
        self.trailing = metadata


def _predict() -> ps.PredictRequest:
    request = ps.PredictRequest()
    request.model_spec.name = "affine"
    tensor = request.inputs["x"]
    tensor.dtype = 1  # DT_FLOAT
    tensor.tensor_shape.dim.add(size=1)
    tensor.tensor_shape.dim.add(size=4)
    tensor.float_val.extend([1.0, 2.0, 3.0, 4.0])
    return request


def test_calls_pass_inferds_token_check_and_end_with_its_status(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path / "affine" / "1", 2.0)
    config = ServerConfig(
        model_base_path=str(tmp_path / "affine"),
        model_name="affine",
        file_system_poll_wait_seconds=0,
        api_token="api-secret",
    )

    async def calls() -> None:
        server = Server(config)
        try:
            await server.control.sync()
            ingress = GrpcIngress(server)

            refused = ServeContext()
            assert await ingress.call("Predict", _predict(), refused) == ps.PredictResponse()
            assert refused.code is grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in refused.details

            answered = ServeContext("Bearer api-secret")
            reply = await ingress.call("Predict", _predict(), answered)
            assert answered.code is None
            assert list(reply.outputs["y"].float_val) == [2.0, 4.0, 6.0, 8.0]
            assert answered.trailing == [("inferd-model-version", "1")]

            admin = ServeContext("Bearer api-secret")
            assert (
                await ingress.call("HandleReloadConfigRequest", mm.ReloadConfigRequest(), admin) is not None
            )
            assert admin.code is grpc.StatusCode.PERMISSION_DENIED
            assert "--admin_token" in admin.details
        finally:
            await server.close()

    asyncio.run(calls())


def test_a_message_that_does_not_parse_answers_invalid_argument(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path / "affine" / "1", 2.0)
    config = ServerConfig(
        model_base_path=str(tmp_path / "affine"), model_name="affine", file_system_poll_wait_seconds=0
    )
    registered: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    class Registry:  # what Serve's gRPC server offers the add_* functions
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            registered.update({f"/{service}/{name}": h for name, h in handlers.items()})

    add_prediction_service(object.__new__(GrpcMethods), Registry())
    parse = registered["/tensorflow.serving.PredictionService/Predict"].request_deserializer
    assert parse is not None
    assert parse(_predict().SerializeToString()) == _predict()
    unparsed = parse(b"\x0a\x05ab")  # field 1 claims 5 bytes; 2 follow
    assert isinstance(unparsed, Unparsed)

    async def call() -> None:
        server = Server(config)
        try:
            await server.control.sync()
            context = ServeContext()
            assert await GrpcIngress(server).call("Predict", unparsed, context) == ps.PredictResponse()
            assert context.code is grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid /tensorflow.serving.PredictionService/Predict message" in context.details
        finally:
            await server.close()

    asyncio.run(call())


def test_a_message_over_max_request_bytes_is_resource_exhausted(tmp_path: Path) -> None:
    """Serve's gRPC server takes messages up to 2 GiB; the replica holds them to
    ``--max_request_bytes`` as grpc's own limit does on ``inferd serve``'s port."""
    write_onnx_affine(tmp_path / "affine" / "1", 2.0)
    config = ServerConfig(
        model_base_path=str(tmp_path / "affine"),
        model_name="affine",
        file_system_poll_wait_seconds=0,
        max_request_bytes=2000,
    )
    large = _predict()
    large.inputs["x"].tensor_shape.dim[0].size = 200
    large.inputs["x"].float_val.extend([1.0] * 796)

    async def calls() -> None:
        server = Server(config)
        try:
            await server.control.sync()
            ingress = GrpcIngress(server)
            refused = ServeContext()
            assert await ingress.call("Predict", large, refused) == ps.PredictResponse()
            assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            size = large.ByteSize()  # grpc's words on inferd serve's port
            assert refused.details == f"SERVER: Received message larger than max ({size} vs. 2000)"
            answered = ServeContext()
            await ingress.call("Predict", _predict(), answered)
            assert answered.code is None
        finally:
            await server.close()

    asyncio.run(calls())


def test_the_health_check_answers_as_inferd_serves_own_health_service(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2

    write_onnx_affine(tmp_path / "affine" / "1", 2.0)
    config = ServerConfig(model_base_path=str(tmp_path / "affine"), model_name="affine")

    async def calls() -> list[tuple[int, grpc.StatusCode | None]]:
        server = Server(config)
        try:
            ingress = GrpcIngress(server)
            answers = []
            for service in ("", "inference.GRPCInferenceService", "grpc.health.v1.Health", "nope"):
                context = ServeContext()
                reply, _ = await ingress.answer(
                    "Check", health_pb2.HealthCheckRequest(service=service), context
                )
                answers.append((reply.status, context.code))
            return answers
        finally:
            await server.close()

    serving = health_pb2.HealthCheckResponse.SERVING
    assert asyncio.run(calls()) == [
        (serving, None),
        (serving, None),
        (0, grpc.StatusCode.NOT_FOUND),  # as grpc's servicer in inferd serve: the service is not listed
        (0, grpc.StatusCode.NOT_FOUND),
    ]


LENGTHS = """
def load(self):
    pass

def predict(self, inputs):
    return {"n": np.array([len(t) for t in inputs["text"]], dtype=np.int64)}
"""


def test_decoded_strings_are_held_in_the_byte_budget_and_given_back(tmp_path: Path) -> None:
    """As on inferd's own gRPC port: a call's decoded strings count against
    ``--max_inflight_bytes`` while it runs, and nothing stays held after it, nor after a REST
    request made before it in the same task."""
    signature = (
        '{"inputs": [{"name": "text", "dtype": "string", "shape": [-1]}], '
        '"outputs": [{"name": "n", "dtype": "int64", "shape": [-1]}]}'
    )
    write_python_model(tmp_path / "lengths" / "1", LENGTHS, signature)
    (tmp_path / "lengths" / "inferd.toml").write_text("warmup = false\n")
    mib = 1 << 20
    config = ServerConfig(
        model_base_path=str(tmp_path / "lengths"),
        model_name="lengths",
        file_system_poll_wait_seconds=0,
        max_request_bytes=4 * mib,
        max_inflight_bytes=8 * mib,
    )

    def infer(count: int) -> v2.ModelInferRequest:
        request = v2.ModelInferRequest(model_name="lengths")
        request.inputs.add(name="text", datatype="BYTES", shape=[count]).contents.bytes_contents.extend(
            [b"ab"] * count
        )
        return request

    async def calls() -> None:
        server = Server(config)
        try:
            await server.control.sync()
            ingress = GrpcIngress(server)
            refused = ServeContext()
            await ingress.call("ModelInfer", infer(150_000), refused)  # about 10 MB decoded
            assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max_inflight_bytes" in refused.details
            assert server.inflight.held == 0
            app, sent = server.http_app(), []
            scope = {
                "type": "http",
                "method": "GET",
                "path": "/v2/health/live",
                "raw_path": b"/v2/health/live",
            }
            scope |= {"query_string": b"", "headers": []}

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(scope, receive, send)  # in this task: it must leave no reservation behind
            assert sent[0]["status"] == 200
            answered = ServeContext()
            reply = await ingress.call("ModelInfer", infer(20_000), answered)
            assert answered.code is None
            assert len(reply.raw_output_contents[0]) == 8 * 20_000
            assert server.inflight.held == 0
        finally:
            await server.close()

    asyncio.run(calls())
