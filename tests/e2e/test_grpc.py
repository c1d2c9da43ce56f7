"""The gRPC API on --port: the Open Inference Protocol with tritonclient.grpc, TF Serving's
PredictionService and ModelService with stubs generated from inferd's own protos, the standard
health service and server reflection. The stubs of the ``tensorflow-serving-api`` package itself
are used in ``test_tfserving_api.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferd._proto import model_service_pb2 as ms
from inferd._proto import model_service_pb2_grpc as ms_grpc
from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from inferd._proto.tensor_pb2 import TensorProto
from inferd._proto.types_pb2 import DT_FLOAT, DT_INT64, DT_STRING
from tests.conftest import ServerProcess, launch
from tests.e2e.test_metrics import samples
from tests.models import (
    digits,
    digits_classifier,
    write_onnx_digits,
    write_onnx_two_inputs,
    write_python_model,
    write_sklearn_digits,
    write_sklearn_regressor,
)

LIMIT = 1_000_000
TEXT_MODEL = """
def load(self):
    pass

def predict(self, inputs):
    texts = inputs["text"]
    lengths = np.array([len(t) for t in texts.reshape(-1)], dtype=np.int32).reshape(texts.shape)
    upper = np.array([t.upper() for t in texts.reshape(-1)], dtype=object).reshape(texts.shape)
    return {"length": lengths, "upper": upper}
"""
TEXT_SIGNATURE = (
    '{"inputs": [{"name": "text", "dtype": "string", "shape": [-1]}], '
    '"outputs": [{"name": "length", "dtype": "int32", "shape": [-1]}, '
    '{"name": "upper", "dtype": "string", "shape": [-1]}]}'
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    repo = tmp_path_factory.mktemp("grpc")
    write_onnx_digits(repo / "digits" / "1")
    write_onnx_two_inputs(repo / "pair" / "1")
    write_python_model(repo / "text" / "1", TEXT_MODEL, TEXT_SIGNATURE)
    write_sklearn_digits(repo / "classifier" / "1")
    regressor = write_sklearn_regressor(repo / "regressor" / "2")
    return repo, regressor


@pytest.fixture(scope="module")
def server(models: tuple[Path, Any]) -> Iterator[ServerProcess]:
    repo, _ = models
    process = launch(repo, str(repo), f"--max_request_bytes={LIMIT}")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


@pytest.fixture
def client(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_target)


@pytest.fixture
def predict(channel: grpc.Channel) -> ps_grpc.PredictionServiceStub:
    return ps_grpc.PredictionServiceStub(channel)


def rows(start: int, stop: int) -> np.ndarray:
    return digits()[0][start:stop]


def onnx_digits(server: ServerProcess, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    path = Path(server.log_path).parent / "digits" / "1" / "model.onnx"
    return ort.InferenceSession(str(path)).run(None, {"X": x})  # type: ignore[no-any-return]


def tensor_proto(x: np.ndarray, dtype: int = DT_FLOAT) -> TensorProto:
    proto = TensorProto(dtype=dtype, tensor_content=x.tobytes())
    for size in x.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


_TYPED_FIELDS = {
    np.float32: "float_val",
    np.float64: "double_val",
    np.int32: "int_val",
    np.int64: "int64_val",
}


def to_numpy(proto: TensorProto, dtype: type) -> np.ndarray:
    """An answer's tensor: TF Serving (and inferd) fill the typed field of the dtype by default,
    ``tensor_content`` with ``--enable_serialization_as_tensor_content``."""
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    return np.array(getattr(proto, _TYPED_FIELDS[dtype]), dtype=dtype).reshape(shape)


class _Status:
    """``with _Status(code, fragment):`` expects an RpcError with that code and message fragment."""

    def __init__(self, code: grpc.StatusCode, fragment: str) -> None:
        self.code, self.fragment = code, fragment

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> bool:
        assert isinstance(error, grpc.RpcError), f"expected {self.code}, got {error!r}"
        assert error.code() == self.code, (error.code(), error.details())
        assert self.fragment in (error.details() or ""), error.details()
        return True


# --- the Open Inference Protocol, with tritonclient.grpc -------------------------------------


def test_v2_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("nosuch")
    assert client.get_server_metadata(as_json=True)["name"] == "inferd"
    metadata = client.get_model_metadata("digits", as_json=True)
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "X", "datatype": "FP32", "shape": ["-1", "64"]}]
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nosuch' is not found"):
        client.get_model_metadata("nosuch")


def test_v2_infer_matches_onnx_and_rest(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    x = rows(0, 5)
    tensor = grpcclient.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("digits", [tensor], request_id="req-9")
    assert result.get_response().id == "req-9"
    assert result.get_response().model_version == "1"
    label, proba = onnx_digits(server, x)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), proba)
    v1 = requests.post(f"{server.url}/v1/models/digits:predict", json={"inputs": x.tolist()}, timeout=10)
    np.testing.assert_array_equal(np.asarray(v1.json()["outputs"]["probabilities"], np.float32), proba)


def test_v2_output_selection_and_two_inputs(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[10], [20]], dtype=np.int64)
    inputs = [grpcclient.InferInput("a", [2, 3], "FP32"), grpcclient.InferInput("b", [2, 1], "INT64")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("pair", inputs, outputs=[grpcclient.InferRequestedOutput("sum")])
    assert [o.name for o in result.get_response().outputs] == ["sum"]
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    assert result.as_numpy("count") is None


def test_v2_bytes_tensors(client: grpcclient.InferenceServerClient) -> None:
    texts = np.array([b"hello", b"inferd", b""], dtype=object)
    tensor = grpcclient.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(texts)
    result = client.infer("text", [tensor])
    assert result.as_numpy("length").tolist() == [5, 6, 0]
    assert result.as_numpy("upper").tolist() == [b"HELLO", b"INFERD", b""]


def test_v2_typed_contents(server: ServerProcess, channel: grpc.Channel) -> None:
    x = rows(5, 7)
    request = service_pb2.ModelInferRequest(model_name="digits", model_version="1")
    tensor = request.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert [o.name for o in reply.outputs] == ["label", "probabilities"]
    label, proba = onnx_digits(server, x)
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.int64), label)
    np.testing.assert_array_equal(
        np.frombuffer(reply.raw_output_contents[1], np.float32).reshape(2, 10), proba
    )


@pytest.mark.parametrize(
    ("shape", "datatype", "fragment"),
    [
        ([1, 63], "FP32", "input 'X': expected FP32 [-1, 64], got FP32 [1, 63]"),
        ([1, 64], "FP99", "input 'X': unknown datatype 'FP99'"),
        ([2, 64], "FP32", "input 'X': 128 elements of FP32 take 512 bytes"),
    ],
)
def test_v2_bad_input_is_invalid_argument(
    channel: grpc.Channel, shape: list[int], datatype: str, fragment: str
) -> None:
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="X", datatype=datatype, shape=shape)
    request.raw_input_contents.append(np.zeros(shape[1], np.float32).tobytes())
    with _Status(grpc.StatusCode.INVALID_ARGUMENT, fragment):
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)


def test_v2_unknown_model_and_output(client: grpcclient.InferenceServerClient) -> None:
    tensor = grpcclient.InferInput("X", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nosuch'") as error:
        client.infer("nosuch", [tensor])
    assert error.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="unknown output 'nope'") as error:
        client.infer("digits", [tensor], outputs=[grpcclient.InferRequestedOutput("nope")])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="output 'label' is requested twice") as error:
        client.infer("digits", [tensor], outputs=[grpcclient.InferRequestedOutput("label")] * 2)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"


# --- TF Serving's PredictionService and ModelService ------------------------------------------


def test_predict_with_tensor_content(server: ServerProcess, predict: ps_grpc.PredictionServiceStub) -> None:
    x = rows(10, 14)
    request = ps.PredictRequest(model_spec=ps.ModelSpec(name="digits"))
    request.inputs["X"].CopyFrom(tensor_proto(x))
    reply = predict.Predict(request, timeout=10)
    assert reply.model_spec.name == "digits"
    assert reply.model_spec.version.value == 1
    assert reply.model_spec.signature_name == "serving_default"
    label, proba = onnx_digits(server, x)
    assert reply.outputs["label"].dtype == DT_INT64
    np.testing.assert_array_equal(to_numpy(reply.outputs["label"], np.int64), label)
    np.testing.assert_array_equal(to_numpy(reply.outputs["probabilities"], np.float32), proba)


def test_predict_with_typed_values_and_output_filter(
    server: ServerProcess, predict: ps_grpc.PredictionServiceStub
) -> None:
    x = rows(14, 16)
    request = ps.PredictRequest(output_filter=["probabilities"])
    request.model_spec.name = "digits"
    request.model_spec.version.value = 1
    tensor = request.inputs["X"]
    tensor.dtype = DT_FLOAT
    tensor.tensor_shape.dim.add(size=2)
    tensor.tensor_shape.dim.add(size=64)
    tensor.float_val.extend(x.reshape(-1).tolist())
    reply = predict.Predict(request, timeout=10)
    assert list(reply.outputs) == ["probabilities"]
    np.testing.assert_array_equal(
        to_numpy(reply.outputs["probabilities"], np.float32), onnx_digits(server, x)[1]
    )


def test_predict_fills_a_shape_from_one_value(predict: ps_grpc.PredictionServiceStub) -> None:
    request = ps.PredictRequest(model_spec=ps.ModelSpec(name="pair"))
    a = request.inputs["a"]
    a.dtype = DT_FLOAT
    a.tensor_shape.dim.add(size=2)
    a.tensor_shape.dim.add(size=3)
    a.float_val.append(1.5)
    b = request.inputs["b"]
    b.dtype = DT_INT64
    b.tensor_shape.dim.add(size=2)
    b.tensor_shape.dim.add(size=1)
    b.int64_val.extend([1, 2])
    reply = predict.Predict(request, timeout=10)
    np.testing.assert_array_equal(to_numpy(reply.outputs["sum"], np.float32), [[2.5] * 3, [3.5] * 3])


def test_predict_strings(predict: ps_grpc.PredictionServiceStub) -> None:
    request = ps.PredictRequest(model_spec=ps.ModelSpec(name="text"))
    text = request.inputs["text"]
    text.dtype = DT_STRING
    text.tensor_shape.dim.add(size=2)
    text.string_val.extend([b"ab", b"xyz"])
    reply = predict.Predict(request, timeout=10)
    assert list(reply.outputs["upper"].string_val) == [b"AB", b"XYZ"]
    assert to_numpy(reply.outputs["length"], np.int32).tolist() == [2, 3]


def test_get_model_metadata(predict: ps_grpc.PredictionServiceStub) -> None:
    request = ps.GetModelMetadataRequest(model_spec=ps.ModelSpec(name="classifier"))
    request.metadata_field.append("signature_def")
    reply = predict.GetModelMetadata(request, timeout=10)
    assert reply.model_spec.name == "classifier"
    assert reply.model_spec.version.value == 1
    packed = reply.metadata["signature_def"]
    assert packed.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    signatures = ps.SignatureDefMap()
    packed.Unpack(signatures)
    assert sorted(signatures.signature_def) == ["classify", "predict_proba", "serving_default"]
    classify = signatures.signature_def["classify"]
    assert classify.method_name == "tensorflow/serving/classify"
    assert [d.size for d in classify.inputs["inputs"].tensor_shape.dim] == [-1, 64]
    assert sorted(classify.outputs) == ["classes", "scores"]
    with _Status(grpc.StatusCode.INVALID_ARGUMENT, "at least one metadata_field"):
        predict.GetModelMetadata(ps.GetModelMetadataRequest(model_spec=request.model_spec), timeout=10)


def test_get_model_status(channel: grpc.Channel) -> None:
    stub = ms_grpc.ModelServiceStub(channel)
    reply = stub.GetModelStatus(
        ms.GetModelStatusRequest(model_spec=ps.ModelSpec(name="regressor")), timeout=10
    )
    (status,) = reply.model_version_status
    assert status.version == 2
    assert status.state == ms.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0
    with _Status(grpc.StatusCode.NOT_FOUND, "nosuch"):
        stub.GetModelStatus(ms.GetModelStatusRequest(model_spec=ps.ModelSpec(name="nosuch")), timeout=10)
    with _Status(grpc.StatusCode.PERMISSION_DENIED, "admin operations are disabled"):
        stub.HandleReloadConfigRequest(ms.ReloadConfigRequest(), timeout=10)


def examples(x: np.ndarray) -> ps.Input:
    input_ = ps.Input()
    for row in x:
        example = input_.example_list.examples.add()
        example.features.feature["inputs"].float_list.value.extend(row.tolist())
    return input_


def test_classify(predict: ps_grpc.PredictionServiceStub) -> None:
    x = rows(20, 23)
    request = ps.ClassificationRequest(model_spec=ps.ModelSpec(name="classifier"), input=examples(x))
    reply = predict.Classify(request, timeout=10)
    assert reply.model_spec.signature_name == "classify"
    scores = digits_classifier().predict_proba(x)  # type: ignore[attr-defined]
    got = [[(c.label, c.score) for c in result.classes] for result in reply.result.classifications]
    assert [[label for label, _ in row] for row in got] == [[str(i) for i in range(10)]] * 3
    np.testing.assert_allclose([[score for _, score in row] for row in got], scores, rtol=1e-5, atol=1e-7)


def test_regress_and_multi_inference(
    models: tuple[Path, Any], predict: ps_grpc.PredictionServiceStub
) -> None:
    x = rows(30, 34)
    expected = models[1].predict(x)
    request = ps.RegressionRequest(model_spec=ps.ModelSpec(name="regressor"), input=examples(x))
    reply = predict.Regress(request, timeout=10)
    assert reply.model_spec.version.value == 2
    np.testing.assert_allclose([r.value for r in reply.result.regressions], expected, rtol=1e-5)
    multi = ps.MultiInferenceRequest(input=examples(x))
    multi.tasks.add(model_spec=ps.ModelSpec(name="regressor"), method_name="tensorflow/serving/regress")
    (result,) = predict.MultiInference(multi, timeout=10).results
    np.testing.assert_allclose([r.value for r in result.regression_result.regressions], expected, rtol=1e-5)
    # one signature twice is refused, as TF Serving refuses it (it was run, and answered, twice)
    multi.tasks.add(model_spec=ps.ModelSpec(name="regressor"), method_name="tensorflow/serving/regress")
    with _Status(grpc.StatusCode.INVALID_ARGUMENT, "Duplicate evaluation of signature: serving_default"):
        predict.MultiInference(multi, timeout=10)


@pytest.mark.parametrize("method", ["tensorflow/serving/predict", "", "nosuch"])
def test_multi_inference_of_an_unsupported_method_is_unimplemented(
    predict: ps_grpc.PredictionServiceStub, method: str
) -> None:
    """TF Serving's multi_inference.cc answers a task method other than classify or regress
    UNIMPLEMENTED, "Unsupported signature method_name: ...", and checks every task before any runs."""
    multi = ps.MultiInferenceRequest(input=examples(rows(30, 32)))
    first = ps.ModelSpec(name="classifier", signature_name="classify")
    multi.tasks.add(model_spec=first, method_name="tensorflow/serving/classify")
    multi.tasks.add(
        model_spec=ps.ModelSpec(name="classifier", signature_name="predict_proba"), method_name=method
    )
    with _Status(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {method}"):
        predict.MultiInference(multi, timeout=10)


def test_multi_inference_of_an_unknown_model_is_not_found_before_its_methods_are_checked(
    predict: ps_grpc.PredictionServiceStub,
) -> None:
    """TF Serving looks the model up (its first task's model_spec) before it reads the tasks: an
    unknown model is NOT_FOUND whatever its tasks' methods, not UNIMPLEMENTED."""
    multi = ps.MultiInferenceRequest(input=examples(rows(30, 32)))
    multi.tasks.add(model_spec=ps.ModelSpec(name="nosuchmodel"), method_name="tensorflow/serving/predict")
    with _Status(grpc.StatusCode.NOT_FOUND, "nosuchmodel"):
        predict.MultiInference(multi, timeout=10)


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        (tensor_proto(np.zeros((1, 63), np.float32)), "input 'X': expected FP32 [-1, 64], got FP32 [1, 63]"),
        (TensorProto(dtype=DT_FLOAT, tensor_content=b"\0" * 10), "input 'X': DT_FLOAT [] takes 4 bytes"),
        (TensorProto(dtype=DT_FLOAT, float_val=[1.0, 2.0]), "input 'X': DT_FLOAT [] needs 1 values"),
        (TensorProto(dtype=0, float_val=[1.0]), "input 'X': dtype DT_INVALID is not supported"),
    ],
)
def test_predict_bad_input_is_invalid_argument(
    predict: ps_grpc.PredictionServiceStub, tensor: TensorProto, fragment: str
) -> None:
    request = ps.PredictRequest(model_spec=ps.ModelSpec(name="digits"))
    request.inputs["X"].CopyFrom(tensor)
    with _Status(grpc.StatusCode.INVALID_ARGUMENT, fragment):
        predict.Predict(request, timeout=10)


def test_predict_unknown_model_and_output(predict: ps_grpc.PredictionServiceStub) -> None:
    with _Status(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nosuch)"):
        predict.Predict(ps.PredictRequest(model_spec=ps.ModelSpec(name="nosuch")), timeout=10)
    request = ps.PredictRequest(model_spec=ps.ModelSpec(name="digits"), output_filter=["z"])
    with _Status(grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found in signature: z"):
        predict.Predict(request, timeout=10)


def test_oversized_message_is_resource_exhausted(predict: ps_grpc.PredictionServiceStub) -> None:
    request = ps.PredictRequest(model_spec=ps.ModelSpec(name="digits"))
    request.inputs["X"].CopyFrom(tensor_proto(np.zeros((LIMIT // 256 + 1, 64), np.float32)))
    with _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, ""):
        predict.Predict(request, timeout=10)
    # one typed value may not fill a tensor larger than a request may be
    request.inputs["X"].CopyFrom(TensorProto(dtype=DT_FLOAT, float_val=[1.0]))
    request.inputs["X"].tensor_shape.dim.add(size=LIMIT)
    request.inputs["X"].tensor_shape.dim.add(size=64)
    with _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "input 'X': filling DT_FLOAT [1000000, 64]"):
        predict.Predict(request, timeout=10)


# --- health and reflection --------------------------------------------------------------------


def test_health_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService", "inference.GRPCInferenceService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name for service in reply.list_services_response.service}
    assert names >= {
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    }


@pytest.mark.parametrize(
    ("symbol", "file_name"),
    [
        ("tensorflow.serving.PredictionService", "inferd/_proto/prediction_service.proto"),
        ("inference.GRPCInferenceService", "inferd/_proto/grpc_service.proto"),
        ("grpc.health.v1.Health", "grpc_health/v1/health.proto"),
    ],
)
def test_reflection_describes_each_service(channel: grpc.Channel, symbol: str, file_name: str) -> None:
    """What grpcurl does before it calls a method: fetch the file that declares the service."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    (reply,) = stub.ServerReflectionInfo(iter([request]))
    assert not reply.HasField("error_response"), reply.error_response.error_message
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    assert file_name in {f.name for f in files}
    (service_file,) = (f for f in files if f.name == file_name)
    assert symbol.rsplit(".", 1)[1] in {s.name for s in service_file.service}


def test_multi_inference_is_counted_like_every_inference_call(
    server: ServerProcess, predict: ps_grpc.PredictionServiceStub
) -> None:
    labels = {"model": "regressor", "version": "2", "protocol": "tfserving_grpc", "status": "OK"}

    def counted() -> float:
        return samples(server).get(("inferd_requests_total", frozenset(labels.items())), 0.0)

    before = counted()
    multi = ps.MultiInferenceRequest(input=examples(rows(30, 32)))
    multi.tasks.add(model_spec=ps.ModelSpec(name="regressor"), method_name="tensorflow/serving/regress")
    predict.MultiInference(multi, timeout=10)
    assert counted() == before + 1


def test_grpc_on_the_unix_socket_alone_with_port_0(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``--port=0 --grpc_socket_path=P`` serves gRPC on the socket only, as TF Serving does; the
    socket was ignored with gRPC's port off, and the server served no gRPC at all."""
    repo = tmp_path_factory.mktemp("socket-only")
    write_python_model(repo / "text" / "1", TEXT_MODEL, TEXT_SIGNATURE)
    socket_path = Path(tempfile.mkdtemp(prefix="inferd-sock-", dir="/tmp")) / "grpc.sock"  # short
    process = launch(repo, str(repo), "--port=0", f"--grpc_socket_path={socket_path}")
    try:
        process.wait_available("text")
        with grpc.insecure_channel(f"unix:{socket_path}") as socket_channel:
            stub = health_pb2_grpc.HealthStub(socket_channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert f"gRPC on unix:{socket_path}" in process.log()
    finally:
        process.stop()
        shutil.rmtree(socket_path.parent, ignore_errors=True)
