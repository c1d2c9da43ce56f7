"""OpenTelemetry traces (``--otel_endpoint``) checked at a real OTLP receiver started here: a gRPC
``TraceService`` and an HTTP ``/v1/traces`` endpoint decoding opentelemetry-proto's messages."""

from __future__ import annotations

import secrets
import signal
import socket
import threading
import time
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
from tests.e2e.test_batching import ROW_AWARE_SIGNATURE
from tests.e2e.test_features import fill, write_echo
from tests.models import digits, features_toml, write_onnx_digits, write_python_model
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

STAGES = {"decode", "features", "queue", "predict", "encode"}
# y = 2x per row; n = the rows of the predict call that computed the row; half a second a call.
SLOW_ROW_AWARE = """
thread_safe = True

def load(self):
    pass

def predict(self, inputs):
    import time
    time.sleep(0.5)
    x = inputs["x"]
    return {"y": x * 2, "n": np.full(len(x), len(x), dtype=np.int64)}
"""


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


def check_request_trace(
    spans: list[Any],
    parent_span_id: bytes,
    protocol: str,
    rows: int,
    batch_rows: int | None = None,
    model: str = "digits",
    extra: frozenset[str] = frozenset(),
) -> Any:
    """Check the request's span and its children; ``batch_rows`` (the executed batch) defaults
    to ``rows`` (an unbatched model computes the request alone). Returns the request's span."""
    roots = [s for s in spans if s.name == f"inferd {protocol}"]
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    assert root.parent_span_id == parent_span_id
    children = [s for s in spans if s is not root]
    assert {s.name for s in children} == STAGES | extra
    assert all(s.parent_span_id == root.span_id for s in children)
    assert all(
        root.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano <= root.end_time_unix_nano
        for s in children
    )
    assert attributes(root) == {
        "inferd.model": model,
        "inferd.version": 1,
        "inferd.protocol": protocol,
        "inferd.status": "OK",
        "inferd.request_id": attributes(root)["inferd.request_id"],
        "inferd.request_rows": rows,
        "inferd.batch_size": rows if batch_rows is None else batch_rows,
    }
    return root


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


def test_each_grpc_call_is_traced_under_its_own_traceparent(
    traced: Callable[..., ServerProcess], receiver: Receiver
) -> None:
    """A call without a traceparent, then two with one each: every call's span has its own parent.
    Before, the gate in front of the gRPC services kept the handler of a method's first call, and
    with it that call's traceparent (here none) for every later call."""
    server = traced("grpc")
    x, _ = digits()
    client = grpcclient.InferenceServerClient(server.grpc_target)
    tensor = grpcclient.InferInput("X", [1, 64], "FP32")
    tensor.set_data_from_numpy(x[:1])
    client.infer("digits", [tensor])
    for _ in range(2):
        traceparent, trace_id, span_id = new_traceparent()
        client.infer("digits", [tensor], headers={"traceparent": traceparent})
        check_request_trace(wait_for_trace(server, receiver, trace_id), span_id, "v2_grpc", 1)


def test_the_batch_size_is_the_batch_the_model_computed_not_the_requests_rows(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six requests of 2 rows at once into a batched model that takes 0.5 s a call and answers,
    per row, the rows of the call that computed it: each request's span says that batch size."""
    write_python_model(tmp_path / "repo" / "rows" / "1", SLOW_ROW_AWARE, ROW_AWARE_SIGNATURE)
    (tmp_path / "repo" / "rows" / "inferd.toml").write_text(
        "[batching]\nmax_batch_size = 16\nbatch_timeout_micros = 1000000\nnum_batch_threads = 1\n"
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = launch(tmp_path, str(tmp_path / "repo"), f"--otel_endpoint={receiver.grpc_endpoint}")
    try:
        traces = [new_traceparent() for _ in range(6)]

        def send(traceparent: str) -> int:
            response = requests.post(
                f"{server.url}/v1/models/rows:predict",
                json={"instances": [{"x": [1.0, 2.0]}, {"x": [3.0, 4.0]}]},
                headers={"traceparent": traceparent},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            (computed,) = {row["n"] for row in response.json()["predictions"]}
            return int(computed)

        with futures.ThreadPoolExecutor(6) as pool:
            batches = list(pool.map(send, [t[0] for t in traces]))
        # The first call runs alone; the others queue behind it and are computed together.
        assert max(batches) > 2, batches
        for (_, trace_id, span_id), batch in zip(traces, batches, strict=True):
            spans = wait_for_trace(server, receiver, trace_id)
            check_request_trace(spans, span_id, "tfserving_rest", rows=2, batch_rows=batch, model="rows")
    finally:
        server.stop()


def test_a_redis_feature_lookup_is_a_client_span_of_the_request_with_database_attributes(
    tmp_path: Path, receiver: Receiver, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(redis_server)
    write_echo(tmp_path / "repo", "eta", features_toml(redis_server.url, cache_ttl_s="600"))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = launch(tmp_path, str(tmp_path / "repo"), f"--otel_endpoint={receiver.http_endpoint}")
    try:
        server.wait_for(lambda: server.status("eta") == {"1": "AVAILABLE"}, "the model")
        instances = [{"restaurant_id": "r1", "distance_km": 1.0}, {"restaurant_id": "r2", "distance_km": 2.0}]
        traceparent, trace_id, span_id = new_traceparent()
        response = requests.post(
            f"{server.url}/v1/models/eta:predict",
            json={"instances": instances},
            headers={"traceparent": traceparent},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        server.wait_for(lambda: len(receiver.trace(trace_id)) >= 2 + len(STAGES), "the spans and the lookup")
        spans = receiver.trace(trace_id)
        root = check_request_trace(
            spans, span_id, "tfserving_rest", 2, model="eta", extra=frozenset({"EVAL"})
        )
        (lookup,) = [s for s in spans if s.name == "EVAL"]
        assert lookup.parent_span_id == root.span_id
        assert lookup.trace_id == trace_id  # under the client's trace
        assert lookup.kind == lookup.SPAN_KIND_CLIENT
        assert root.start_time_unix_nano <= lookup.start_time_unix_nano <= lookup.end_time_unix_nano
        assert lookup.end_time_unix_nano <= root.end_time_unix_nano
        assert attributes(lookup) == {
            "db.system.name": "redis",
            "db.system": "redis",
            "db.operation.name": "EVAL",
            "db.namespace": "0",
            "server.address": "127.0.0.1",
            "server.port": redis_server.port,
            "network.transport": "tcp",
            "inferd.feature_entities": 2,
        }
        # Both entities are cached now: the next request asks the store nothing, and has no lookup span.
        traceparent, trace_id, span_id = new_traceparent()
        response = requests.post(
            f"{server.url}/v1/models/eta:predict",
            json={"instances": instances},
            headers={"traceparent": traceparent},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        check_request_trace(
            wait_for_trace(server, receiver, trace_id), span_id, "tfserving_rest", 2, model="eta"
        )
    finally:
        server.stop()


def test_an_embedded_store_lookup_is_a_span_without_database_attributes(
    traced: Callable[..., ServerProcess], receiver: Receiver, tmp_path: Path
) -> None:
    table = tmp_path / "restaurants.csv"
    table.write_text("restaurant_id,incoming_orders,outstanding_per_min\nr1,5,0.5\n")
    write_echo(tmp_path / "repo", "eta", features_toml(str(table), cache_ttl_s="0"))
    server = traced("grpc")
    server.wait_for(lambda: server.status("eta") == {"1": "AVAILABLE"}, "the model")
    traceparent, trace_id, span_id = new_traceparent()
    response = requests.post(
        f"{server.url}/v1/models/eta:predict",
        json={"instances": [{"restaurant_id": "r1", "distance_km": 1.0}]},
        headers={"traceparent": traceparent},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    server.wait_for(lambda: len(receiver.trace(trace_id)) >= 2 + len(STAGES), "the spans and the lookup")
    spans = receiver.trace(trace_id)
    root = check_request_trace(
        spans, span_id, "tfserving_rest", 1, model="eta", extra=frozenset({"features lookup"})
    )
    (lookup,) = [s for s in spans if s.name == "features lookup"]
    assert lookup.parent_span_id == root.span_id
    assert attributes(lookup) == {"inferd.feature_entities": 1}


@pytest.mark.parametrize(
    "traceparent",
    [None, "garbage", f"00-{'0' * 32}-{'1' * 16}-01", f"ff-{'1' * 32}-{'1' * 16}-01"],
    ids=["none", "garbage", "zero-trace-id", "version-ff"],
)
def test_without_a_valid_traceparent_the_sample_rate_decides(
    traced: Callable[..., ServerProcess], receiver: Receiver, traceparent: str | None
) -> None:
    """A malformed ``traceparent`` is ignored, as W3C says: it forced a trace at any rate."""
    server = traced("grpc", "--otel_sample_rate=0")
    x, _ = digits()
    headers = {"traceparent": traceparent} if traceparent else {}
    for _ in range(5):  # none of these is sampled
        requests.post(
            f"{server.url}/v2/models/digits/infer", json=v2_body(x[:1]), headers=headers, timeout=10
        ).raise_for_status()
    good, trace_id, span_id = new_traceparent()  # a client's sampled trace still is, exported last
    requests.post(
        f"{server.url}/v2/models/digits/infer", json=v2_body(x[:1]), headers={"traceparent": good}, timeout=10
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
    assert "--otel_sample_rate must be from 0 to 1, got 2" in server.log()


def v2_body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.mark.parametrize("export", ["grpc", "http/protobuf"])
def test_a_receiver_that_never_answers_does_not_hold_the_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, export: str
) -> None:
    write_onnx_digits(tmp_path / "repo" / "digits" / "1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", export)
    with socket.create_server(("127.0.0.1", 0)) as hole:  # connections wait in its backlog, unanswered
        endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
        server = launch(
            tmp_path, str(tmp_path / "repo"), f"--otel_endpoint={endpoint}", "--drain_timeout_s=1"
        )
        try:
            x, _ = digits()
            for _ in range(5):
                requests.post(f"{server.url}/v2/models/digits/infer", json=v2_body(x[:1]), timeout=10)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=30) == 0
            exited = time.monotonic()
        finally:
            server.stop()
    assert exited - signalled < 1 + 3  # the drain timeout, and the margins of its last steps (not 10 s)
