"""OpenTelemetry traces (``--otel_endpoint``) checked at a real OTLP receiver started here: a gRPC
``TraceService`` and an HTTP ``/v1/traces`` endpoint decoding opentelemetry-proto's messages."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_service
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc

from tests.conftest import ServerProcess, free_port, launch
from tests.models import digits, write_onnx_digits

STAGES = {"decode", "features", "queue", "predict", "encode"}


class Receiver:
    """Collects every span exported to it, over gRPC (``grpc_endpoint``) or HTTP (``http_endpoint``)."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self._lock = threading.Lock()
        receiver = self

        class Service(trace_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the RPC's name)
                receiver.add(request)
                return trace_service.ExportTraceServiceResponse()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(2))
        trace_grpc.add_TraceServiceServicer_to_server(Service(), self._grpc)
        port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self.grpc_endpoint = f"http://127.0.0.1:{port}"

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                assert self.path == "/v1/traces", self.path
                assert self.headers["content-type"] == "application/x-protobuf"
                request = trace_service.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                answer = trace_service.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self.http_endpoint = f"http://127.0.0.1:{self._http.server_address[1]}"

    def add(self, request: Any) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)

    def trace(self, trace_id: bytes) -> list[Any]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def close(self) -> None:
        self._grpc.stop(0)
        self._http.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    collector = Receiver()
    yield collector
    collector.close()


@pytest.fixture
def traced(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., ServerProcess]]:
    """Start inferd on the digits model, exporting to ``receiver`` over ``protocol``."""
    write_onnx_digits(tmp_path / "repo" / "digits" / "1")
    started: list[ServerProcess] = []

    def start(protocol: str, *args: str) -> ServerProcess:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export every 0.1 s, not 5 s
        endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
        server = launch(tmp_path, str(tmp_path / "repo"), f"--otel_endpoint={endpoint}", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def new_traceparent() -> tuple[str, bytes, bytes]:
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    return f"00-{trace_id.hex()}-{span_id.hex()}-01", trace_id, span_id


def attributes(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def wait_for_trace(server: ServerProcess, receiver: Receiver, trace_id: bytes) -> list[Any]:
    server.wait_for(lambda: len(receiver.trace(trace_id)) >= 1 + len(STAGES), "the request's spans")
    return receiver.trace(trace_id)


def check_request_trace(spans: list[Any], parent_span_id: bytes, protocol: str, rows: int) -> None:
    roots = [s for s in spans if s.name == f"inferd {protocol}"]
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    assert root.parent_span_id == parent_span_id
    children = [s for s in spans if s is not root]
    assert {s.name for s in children} == STAGES
    assert all(s.parent_span_id == root.span_id for s in children)
    assert all(
        root.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano <= root.end_time_unix_nano
        for s in children
    )
    assert attributes(root) == {
        "inferd.model": "digits",
        "inferd.version": 1,
        "inferd.protocol": protocol,
        "inferd.status": "OK",
        "inferd.request_id": attributes(root)["inferd.request_id"],
        "inferd.batch_size": rows,
    }


@pytest.mark.parametrize("export", ["grpc", "http/protobuf"])
def test_a_rest_request_is_traced_under_the_clients_traceparent(
    traced: Callable[..., ServerProcess], receiver: Receiver, export: str
) -> None:
    server = traced(export)
    traceparent, trace_id, span_id = new_traceparent()
    x, _ = digits()
    response = requests.post(
        f"{server.url}/v1/models/digits:predict",
        json={"instances": x[:3].tolist()},
        headers={"traceparent": traceparent},
        timeout=10,
    )
    assert response.status_code == 200
    check_request_trace(wait_for_trace(server, receiver, trace_id), span_id, "tfserving_rest", 3)


@pytest.mark.parametrize("export", ["grpc", "http/protobuf"])
def test_a_grpc_request_is_traced_under_the_clients_traceparent(
    traced: Callable[..., ServerProcess], receiver: Receiver, export: str
) -> None:
    server = traced(export)
    traceparent, trace_id, span_id = new_traceparent()
    x, _ = digits()
    client = grpcclient.InferenceServerClient(server.grpc_target)
    tensor = grpcclient.InferInput("X", [2, 64], "FP32")
    tensor.set_data_from_numpy(x[:2])
    result = client.infer("digits", [tensor], headers={"traceparent": traceparent})
    assert result.as_numpy("label").shape == (2,)
    check_request_trace(wait_for_trace(server, receiver, trace_id), span_id, "v2_grpc", 2)


def test_without_a_traceparent_the_sample_rate_decides(
    traced: Callable[..., ServerProcess], receiver: Receiver
) -> None:
    server = traced("grpc", "--otel_sample_rate=0")
    x, _ = digits()
    for _ in range(20):  # none of these is sampled
        requests.post(
            f"{server.url}/v2/models/digits/infer", json=v2_body(x[:1]), timeout=10
        ).raise_for_status()
    traceparent, trace_id, span_id = new_traceparent()  # a client's sampled trace still is
    requests.post(
        f"{server.url}/v2/models/digits/infer",
        json=v2_body(x[:1]),
        headers={"traceparent": traceparent},
        timeout=10,
    ).raise_for_status()
    check_request_trace(wait_for_trace(server, receiver, trace_id), span_id, "v2_rest", 1)
    assert {s.trace_id for s in receiver.spans} == {trace_id}


def test_at_rate_one_every_request_is_a_root_trace(
    traced: Callable[..., ServerProcess], receiver: Receiver
) -> None:
    server = traced("grpc")
    x, _ = digits()
    requests.post(f"{server.url}/v2/models/digits/infer", json=v2_body(x[:1]), timeout=10).raise_for_status()
    server.wait_for(lambda: any(s.name == "inferd v2_rest" for s in receiver.spans), "a root span")
    root = next(s for s in receiver.spans if s.name == "inferd v2_rest")
    assert root.parent_span_id == b""
    failed = requests.post(f"{server.url}/v2/models/digits/versions/9/infer", json=v2_body(x[:1]), timeout=10)
    assert failed.status_code == 404
    server.wait_for(
        lambda: any(attributes(s).get("inferd.status") == "NOT_FOUND" for s in receiver.spans),
        "the failed call's span",
    )


def test_the_otel_flag_needs_a_valid_rate(tmp_path: Path) -> None:
    write_onnx_digits(tmp_path / "repo" / "digits" / "1")
    server = launch(
        tmp_path, str(tmp_path / "repo"), "--otel_endpoint=127.0.0.1:1", "--otel_sample_rate=2", wait=False
    )
    assert server.process.wait(timeout=60) != 0
    assert "--otel_sample_rate: expected a number from 0 to 1, got 2" in server.log()


def v2_body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
