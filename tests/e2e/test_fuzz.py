"""End to end: hostile input against a real server. schemathesis fuzzes every REST operation of
``/openapi.json`` (stateless and stateful phases) and finds no 5xx, no undocumented status or
content type and no response off the schema; tiny requests that declare huge tensors are
refused, on every protocol, without the server's memory growing."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from tritonclient.grpc import service_pb2 as v2_pb
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from inferd._proto.types_pb2 import DT_FLOAT
from inferd.protocols import openapi
from tests.conftest import ServerProcess, launch
from tests.models import write_onnx_affine, write_onnx_two_inputs, write_python_model

ADMIN = "fuzz-admin"
MAX_EXAMPLES = int(os.environ.get("INFERD_FUZZ_EXAMPLES", "30"))
"""schemathesis cases per operation and phase; 30 keeps the run near a minute on a loaded box."""
SEED = int(os.environ.get("INFERD_FUZZ_SEED", "20261124"))
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
HEADROOM_KIB = 64 * 1024
"""How much the server's peak RSS may grow while it refuses the zip bombs (each declares >= 4 GB)."""

ECHO = """
thread_safe = True

def load(self):
    pass

def predict(self, inputs):
    return {"s": inputs["s"]}
"""
ECHO_SIGNATURE = (
    '{"inputs": [{"name": "s", "dtype": "string", "shape": [-1]}], '
    '"outputs": [{"name": "s", "dtype": "string", "shape": [-1]}]}'
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz")
    models = root / "models"
    write_onnx_affine(models / "affine" / "1", scale=2.0, offset=1.0)  # x: FP32 [-1, 4] -> y
    (models / "affine" / "inferd.toml").write_text("[labels]\nstable = 1\n")
    write_onnx_affine(models / "spare" / "1", scale=1.0)  # the one the fuzzer may unload
    write_onnx_two_inputs(models / "pair" / "1")  # a: FP32 [-1, 3], b: INT64 [-1, 1]
    write_python_model(models / "echo" / "1", ECHO, ECHO_SIGNATURE)  # s: BYTES [-1]
    process = launch(root, str(models), f"--admin_token={ADMIN}")
    yield process
    process.stop()


def test_openapi_document_is_served(server: ServerProcess) -> None:
    response = requests.get(f"{server.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == openapi.document()


def _config(path: Path) -> Path:
    """schemathesis settings: path parameters are mostly the served models (so that bodies reach
    the decoders), sometimes anything; ``spare`` is the only model the fuzzer may unload."""
    path.write_text(
        """
[dictionaries.models]
values = ["affine", "pair", "echo", "spare"]

[dictionaries.versions]
values = [1, 2]

[parameters]
"path.model_name" = { dictionary = "models", probability = 0.8 }
"path.version" = { dictionary = "versions", probability = 0.8 }
"path.label" = "stable"

[[operations]]
include-path = "/v2/repository/models/{model_name}/unload"
parameters = { "path.model_name" = "spare" }

[[operations]]
include-path = "/v2/repository/models/{model_name}/load"
parameters = { "path.model_name" = "spare" }
"""
    )
    return path


def test_schemathesis_finds_no_failures(server: ServerProcess, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(_config(tmp_path / "schemathesis.toml")),
        "run",
        f"{server.url}/openapi.json",
        f"--checks={CHECKS}",
        f"--max-examples={MAX_EXAMPLES}",
        f"--seed={SEED}",
        "--workers=1",
        "--phases=examples,coverage,fuzzing,stateful",
        f"--header=Authorization: Bearer {ADMIN}",
        "--request-timeout=30",
        "--report=json",
        f"--report-json-path={report}",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    summary = json.loads(report.read_text()) if report.exists() else {}
    cases = summary.get("test_cases", {})
    print(f"schemathesis: {cases} (seed {SEED}, {MAX_EXAMPLES} examples per operation)")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    # every operation but GET /openapi.json, which schemathesis leaves out as the schema itself
    operations = len([op for item in openapi.document()["paths"].values() for op in item])
    assert summary["operations"]["tested"] == summary["operations"]["total"] == operations - 1
    assert cases["generated"] > 500
    assert cases["with_failures"] == cases["errored"] == 0
    assert set(summary["phases"]) >= {"examples", "coverage", "fuzzing", "stateful"}
    assert server.process.poll() is None
    assert "Traceback" not in server.log(), server.log()[-4000:]


def _peak_rss_kib(server: ServerProcess) -> int:
    """The server process's peak resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


HUGE = [1 << 20, 1 << 20]
"""A declared shape of 2**40 elements: 4 TiB of FP32."""


def test_zip_bombs_are_refused_before_allocation(server: ServerProcess) -> None:
    url = f"{server.url}/v2/models/affine/infer"
    peak = _peak_rss_kib(server)

    # V2 JSON: a tiny body that declares a huge shape
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": HUGE, "data": [1.0]}]}
    r = requests.post(url, json=body, timeout=10)
    assert r.status_code == 413, r.text
    assert "--max_tensor_elements" in r.json()["error"]

    # a zero dim beside a huge one: no elements, but still refused
    body["inputs"][0]["shape"] = [0, 1 << 62]
    r = requests.post(url, json=body, timeout=10)
    assert r.status_code == 413, r.text
    assert "--max_tensor_elements" in r.json()["error"]

    # V2 binary extension: the JSON header declares a huge tensor, 4 bytes follow
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": HUGE, "parameters": {"binary_data_size": 4}}]}
    ).encode()
    r = requests.post(
        url,
        data=header + b"\0" * 4,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=10,
    )
    assert r.status_code == 413, r.text
    assert "--max_tensor_elements" in r.json()["error"]

    # BYTES in the binary extension: one element claims 4 GB
    header = json.dumps(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]}
    ).encode()
    r = requests.post(
        f"{server.url}/v2/models/echo/infer",
        data=header + struct.pack("<I", 0xFFFFFFFF) + b"abcd",
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=10,
    )
    assert r.status_code == 413, r.text
    assert "--max_string_bytes" in r.json()["error"]

    # TF Serving gRPC: one float_val fills a declared 4 TiB tensor
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = ps_grpc.PredictionServiceStub(channel)
        request = ps.PredictRequest()
        request.model_spec.name = "affine"
        tensor = request.inputs["x"]
        tensor.dtype = DT_FLOAT
        for size in HUGE:
            tensor.tensor_shape.dim.add(size=size)
        tensor.float_val.append(1.0)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max_tensor_elements" in (refused.value.details() or "")

        # V2 gRPC: a huge shape with typed contents
        v2 = v2_grpc.GRPCInferenceServiceStub(channel)
        infer = v2_pb.ModelInferRequest(model_name="affine")
        infer.inputs.add(name="x", datatype="FP32", shape=HUGE).contents.fp32_contents.append(1.0)
        with pytest.raises(grpc.RpcError) as refused:
            v2.ModelInfer(infer, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max_tensor_elements" in (refused.value.details() or "")

    grown = _peak_rss_kib(server) - peak
    print(f"peak RSS before {peak} KiB, growth while refusing {grown} KiB")
    assert grown < HEADROOM_KIB

    # and the server still answers
    good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    r = requests.post(url, json=good, timeout=10)
    assert r.status_code == 200
    assert np.allclose(r.json()["outputs"][0]["data"], [3, 5, 7, 9])


def test_oversized_headers_are_refused(server: ServerProcess) -> None:
    r = requests.get(f"{server.url}/v2/health/live", headers={"X-Padding": "a" * 70_000}, timeout=10)
    assert r.status_code == 413, r.text
    assert "--max_header_bytes" in r.json()["error"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        v2 = v2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            v2.ServerLive(v2_pb.ServerLiveRequest(), metadata=[("x-padding", "a" * 70_000)], timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "65536" in (refused.value.details() or "")


def test_inputs_that_once_raised_server_errors_get_4xx(server: ServerProcess) -> None:
    """Each of these answered 500 (or gRPC INTERNAL) before the fix that came with this test."""
    url = f"{server.url}/v2/models/affine/infer"
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    for outputs, fragment in (
        ([{"name": ["y"]}], "unknown output ['y']"),  # unhashable name: TypeError
        ([{"name": "y", "parameters": [1]}], "'parameters' must be an object"),  # AttributeError
    ):
        r = requests.post(url, json={"inputs": [tensor], "outputs": outputs}, timeout=10)
        assert r.status_code == 400, r.text
        assert fragment in r.json()["error"]
    # a shape whose element count wraps int64 to 0 in numpy: ValueError on reshape
    wrapped = {"inputs": [{**tensor, "shape": [1 << 32, 1 << 32], "data": []}]}
    r = requests.post(url, json=wrapped, timeout=10)
    assert r.status_code == 413, r.text
    # a non-ASCII digit passes str.isdigit() but not int(): ValueError
    body = json.dumps({"inputs": [tensor]}).encode()
    r = requests.post(url, data=body, headers={"Inference-Header-Content-Length": "\xb2"}, timeout=10)
    assert r.status_code == 400, r.text
    assert "Inference-Header-Content-Length".lower() in r.json()["error"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        v2 = v2_grpc.GRPCInferenceServiceStub(channel)
        request = v2_pb.ModelInferRequest(model_name="affine", model_version="\u00b2")
        with pytest.raises(grpc.RpcError) as refused:
            v2.ModelInfer(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_each_limit_follows_its_flag(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    write_onnx_affine(tmp_path / "models" / "affine" / "1", scale=1.0)
    server = start_server(
        str(tmp_path / "models"),
        "--max_tensor_elements=8",
        "--max_json_depth=3",
        "--max_string_bytes=4",
        "--max_instances=2",
        "--max_header_bytes=2000",
    )
    predict = f"{server.url}/v1/models/affine:predict"
    for body, status, flag in (
        ({"instances": [[1, 2, 3, 4]] * 3}, 413, "--max_instances"),
        ({"inputs": [[1, 2, 3, 4]] * 3}, 413, "--max_tensor_elements"),
        ({"inputs": [[[[1.0]]]]}, 400, "--max_json_depth"),
        ({"inputs": ["abcde"]}, 413, "--max_string_bytes"),
    ):
        r = requests.post(predict, json=body, timeout=10)
        assert r.status_code == status, r.text
        assert flag in r.json()["error"]
    r = requests.get(f"{server.url}/v2/health/live", headers={"X-Padding": "a" * 2000}, timeout=10)
    assert r.status_code == 413, r.text
    assert "--max_header_bytes" in r.json()["error"]
    r = requests.post(predict, json={"instances": [[1, 2, 3, 4]] * 2}, timeout=10)
    assert (r.status_code, r.json()) == (200, {"predictions": [[1, 2, 3, 4]] * 2})
