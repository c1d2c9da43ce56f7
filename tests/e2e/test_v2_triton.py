"""What Triton's and KServe's clients ask of the Open Inference Protocol beyond its core: the
statistics extension, a model repository load with a config override, a gRPC ModelInfer that
mixes typed contents with raw inputs (KServe's client sends it), FP16, BYTES through an ONNX
string model, and Triton's wording for unknown models and failed loads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from inferd._proto import grpc_service_pb2 as pb
from inferd._proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, launch
from tests.models import write_onnx_affine, write_onnx_two_inputs, write_python_model

ADMIN = "admin-secret"
AS_ADMIN = {"authorization": f"Bearer {ADMIN}"}
HALF_MODEL = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": inputs["x"] + inputs["w"].astype(np.float16)}
"""
HALF_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float16", "shape": [-1, 2]}, '
    '{"name": "w", "dtype": "float32", "shape": [-1, 2]}], '
    '"outputs": [{"name": "y", "dtype": "float16", "shape": [-1, 2]}]}'
)


def write_onnx_text_identity(version_dir: Path) -> None:
    """``out`` = ``text``, ONNX strings [-1, -1]."""
    text = helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", "n"])
    out = helper.make_tensor_value_info("out", TensorProto.STRING, ["batch", "n"])
    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["out"])], "text", [text], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version_dir.mkdir(parents=True)
    onnx.save(model, version_dir / "model.onnx")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("triton")
    write_onnx_two_inputs(repo / "pair" / "1")
    write_onnx_affine(repo / "affine" / "1", scale=2.0)
    write_onnx_affine(repo / "batched" / "1", scale=3.0)
    (repo / "batched" / "inferd.toml").write_text("[batching]\nmax_batch_size = 4\n")
    write_onnx_text_identity(repo / "text" / "1")
    write_python_model(repo / "half" / "1", HALF_MODEL, HALF_SIGNATURE)
    process = launch(repo, str(repo), f"--admin_token={ADMIN}")
    yield process
    process.stop()


@pytest.fixture
def http(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture
def grpc_client(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_target)


def _x(module: Any, rows: int, value: float = 1.0) -> Any:
    tensor = module.InferInput("x", [rows, 4], "FP32")
    tensor.set_data_from_numpy(np.full((rows, 4), value, np.float32))
    return tensor


def test_statistics_count_what_was_served(
    server: ServerProcess,
    http: httpclient.InferenceServerClient,
    grpc_client: grpcclient.InferenceServerClient,
) -> None:
    assert "statistics" in http.get_server_metadata()["extensions"]
    assert "statistics" in grpc_client.get_server_metadata(as_json=True)["extensions"]
    before = http.get_inference_statistics("affine")["model_stats"]
    assert [(s["name"], s["version"], s["inference_count"]) for s in before] == [("affine", "1", 0)]
    for rows in (1, 2, 3):
        http.infer("affine", [_x(httpclient, rows)])
    grpc_client.infer("affine", [_x(grpcclient, 2)])
    wrong = httpclient.InferInput("x", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException):
        http.infer("affine", [wrong])

    (stats,) = http.get_inference_statistics("affine", "1")["model_stats"]
    assert stats["inference_count"] == 8
    assert stats["execution_count"] == 4
    assert stats["last_inference"] > 0
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 4
    assert inference["success"]["ns"] > 0
    assert inference["fail"]["count"] == 1
    assert inference["compute_infer"]["count"] == 4
    assert inference["compute_infer"]["ns"] > 0
    assert inference["queue"]["count"] == 4
    assert inference["compute_infer"]["ns"] <= inference["success"]["ns"]
    batches = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert batches == {1: 1, 2: 2, 3: 1}

    over_grpc = grpc_client.get_inference_statistics("affine", as_json=True)["model_stats"][0]
    assert int(over_grpc["inference_count"]) == 8
    assert int(over_grpc["inference_stats"]["fail"]["count"]) == 1
    assert int(over_grpc["inference_stats"]["success"]["ns"]) == inference["success"]["ns"]

    everything = requests.get(f"{server.url}/v2/models/stats", timeout=10).json()["model_stats"]
    assert {s["name"] for s in everything} == {"pair", "affine", "batched", "text", "half"}


def test_statistics_of_a_batched_model_add_up(http: httpclient.InferenceServerClient) -> None:
    for rows in (1, 3, 2):
        http.infer("batched", [_x(httpclient, rows)])
    (stats,) = http.get_inference_statistics("batched")["model_stats"]
    assert stats["inference_count"] == 6
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in stats["batch_stats"]) == 6
    assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]
    assert stats["inference_stats"]["success"]["count"] == 3


def test_unknown_models_in_tritons_words(
    http: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    for call in (
        lambda: http.get_model_metadata("nosuch"),
        lambda: http.infer("nosuch", [_x(httpclient, 1)]),
        lambda: http.get_inference_statistics("nosuch"),
        lambda: grpc_client.get_model_metadata("nosuch"),
        lambda: grpc_client.infer("nosuch", [_x(grpcclient, 1)]),
        lambda: grpc_client.get_model_config("nosuch"),
        lambda: grpc_client.get_inference_statistics("nosuch"),
    ):
        with pytest.raises(InferenceServerException) as error:
            call()
        assert error.value.message().startswith("Request for unknown model: 'nosuch' is not found")
        assert error.value.status() in ("404", "StatusCode.NOT_FOUND")
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'affine' version 7"):
        http.get_model_metadata("affine", "7")
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'affine' version 7"):
        grpc_client.get_inference_statistics("affine", "7")


def test_load_with_a_config_override(
    http: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    assert http.get_model_config("affine")["max_batch_size"] == 0
    http.load_model("affine", headers=AS_ADMIN, config='{"max_batch_size": "16"}')
    assert http.get_model_config("affine")["max_batch_size"] == 16
    assert grpc_client.get_model_config("affine").config.max_batch_size == 16
    result = http.infer("affine", [_x(httpclient, 2, 1.5)])
    assert np.array_equal(result.as_numpy("y"), np.full((2, 4), 3.0, np.float32))
    grpc_client.load_model(
        "affine",
        headers=AS_ADMIN,
        config='{"name": "affine", "dynamic_batching": {"max_queue_delay_microseconds": 50}}',
    )
    assert grpc_client.get_model_config("affine").config.max_batch_size == 32  # inferd's default
    http.load_model("affine", headers=AS_ADMIN)  # no config: back to inferd.toml (none)
    assert http.get_model_config("affine")["max_batch_size"] == 0


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ('"parameters": {"config": {{"max_batch_size": "16"}}}', "is not valid JSON"),
        ('{"max_batch_size": 8, "instance_group": [{"count": 2}]}', "config keys ['instance_group']"),
        ('{"max_batch_size": 0}', "'max_batch_size' must be an integer >= 1, got 0"),
        ('{"name": "other"}', "config 'name' 'other' is not the model's name 'affine'"),
        ('{"dynamic_batching": {"preferred_batch_size": [4]}}', "keys ['preferred_batch_size']"),
    ],
)
def test_config_overrides_inferd_cannot_honour_are_refused(
    http: httpclient.InferenceServerClient, config: str, fragment: str
) -> None:
    with pytest.raises(InferenceServerException) as error:
        http.load_model("affine", headers=AS_ADMIN, config=config)
    assert error.value.status() == "400"
    assert error.value.message().startswith("failed to load 'affine': ")
    assert fragment in error.value.message()
    assert http.is_model_ready("affine")


def test_failed_loads_in_tritons_words(grpc_client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        grpc_client.load_model("nosuch", headers=AS_ADMIN)
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert unknown.value.message().startswith("failed to load 'nosuch', failed to poll from model repository")
    with pytest.raises(InferenceServerException) as files:
        grpc_client.load_model("affine", headers=AS_ADMIN, config="{}", files={"file:1/model.onnx": b"x"})
    assert files.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "failed to poll from model repository" in files.value.message()
    assert "['file:1/model.onnx'] are not supported" in files.value.message()


def _tensor(name: str, datatype: str, shape: list[int]) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


def test_grpc_infer_mixing_contents_and_raw_inputs(server: ServerProcess) -> None:
    a = _tensor("a", "FP32", [2, 3])
    a.contents.fp32_contents.extend([1, 2, 3, 4, 5, 6])
    b = _tensor("b", "INT64", [2, 1])
    request = pb.ModelInferRequest(model_name="pair", inputs=[a, b])
    request.raw_input_contents.append(np.array([[10], [20]], np.int64).tobytes())
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.ModelInfer(request)
        total = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 3)
        assert np.array_equal(total, [[11, 12, 13], [24, 25, 26]])

        request.raw_input_contents.append(b"\0" * 16)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents has 2 entries for the 1 inputs without contents" in str(error.value.details())


@pytest.mark.parametrize(
    ("model", "names"),
    [
        ("pair", ["a", "b", "é" * 50_000]),
        ("m" * 100_000, ["a"]),
        ("pair", ["a", "b", *map(str, range(3_000))]),
    ],
)
def test_long_messages_keep_their_status(server: ServerProcess, model: str, names: list[str]) -> None:
    # A status travels in the trailers: past the client's 16 KiB limit it became RESOURCE_EXHAUSTED
    request = pb.ModelInferRequest(model_name=model, inputs=[_tensor(name, "FP32", [0]) for name in names])
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request)
    assert error.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert str(error.value.details()).endswith(" characters)")


def test_fp16_raw_beside_fp32_contents(server: ServerProcess) -> None:
    x = _tensor("x", "FP16", [1, 2])
    w = _tensor("w", "FP32", [1, 2])
    w.contents.fp32_contents.extend([0.5, 1.0])
    request = pb.ModelInferRequest(model_name="half", inputs=[x, w])
    request.raw_input_contents.append(np.array([[1.5, -2.0]], np.float16).tobytes())
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.ModelInfer(request)
    assert reply.outputs[0].datatype == "FP16"
    assert np.array_equal(np.frombuffer(reply.raw_output_contents[0], np.float16), [2.0, -1.0])


def test_fp16_with_tritonclient(
    http: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    x = np.array([[1.5, 2.25]], np.float16)
    w = np.array([[1.0, 1.0]], np.float32)
    for module, client in ((httpclient, http), (grpcclient, grpc_client)):
        inputs = [module.InferInput("x", [1, 2], "FP16"), module.InferInput("w", [1, 2], "FP32")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(w)
        y = client.infer("half", inputs).as_numpy("y")
        assert y.dtype == np.float16
        assert np.array_equal(y, [[2.5, 3.25]])


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_through_an_onnx_string_model(http: httpclient.InferenceServerClient, binary: bool) -> None:
    text = np.array([[b"he\x00llo", b"\x00\x01\x02\x03", "caf\u00e9".encode()]], dtype=object)
    tensor = httpclient.InferInput("text", [1, 3], "BYTES")
    tensor.set_data_from_numpy(text, binary_data=binary)
    result = http.infer(
        "text", [tensor], outputs=[httpclient.InferRequestedOutput("out", binary_data=binary)]
    )
    out = result.as_numpy("out")
    assert [item if isinstance(item, bytes) else item.encode() for item in out.reshape(-1)] == list(
        text.reshape(-1)
    )


def _pair(module: Any) -> list[Any]:
    a = module.InferInput("a", [1, 3], "FP32")
    a.set_data_from_numpy(np.ones((1, 3), np.float32))
    b = module.InferInput("b", [1, 1], "INT64")
    b.set_data_from_numpy(np.ones((1, 1), np.int64))
    return [a, b]


def test_parameters_for_triton_features_inferd_does_not_serve_are_refused(
    http: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    """Not answered as if absent: a client asking for the top 3 classes must not get raw scores."""
    for module, client in ((httpclient, http), (grpcclient, grpc_client)):
        with pytest.raises(InferenceServerException) as refused:
            client.infer("pair", _pair(module), outputs=[module.InferRequestedOutput("sum", class_count=3)])
        assert (
            "parameter 'classification' asks for Triton's classification extension" in refused.value.message()
        )
        with pytest.raises(InferenceServerException) as sequence:
            client.infer("pair", _pair(module), sequence_id=7, sequence_start=True)
        assert "parameter 'sequence_id' asks for sequence batching" in sequence.value.message()
        assert client.infer("pair", _pair(module)).as_numpy("sum").tolist() == [[2.0, 2.0, 2.0]]
