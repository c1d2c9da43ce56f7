"""TF Serving's gRPC API with the stubs of the ``tensorflow-serving-api`` package and TensorFlow's own
tensor helpers, as a TF Serving notebook uses them; nothing here comes from inferd's protos."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.conftest import ServerProcess, launch
from tests.models import digits, write_onnx_digits, write_sklearn_digits


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("tfs")
    write_onnx_digits(repo / "digits" / "1")
    write_sklearn_digits(repo / "classifier" / "1")
    process = launch(repo, str(repo))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


def in_process(server: ServerProcess, x: np.ndarray) -> np.ndarray:
    path = server.log_path.parent / "digits" / "1" / "model.onnx"
    return ort.InferenceSession(str(path)).run(["probabilities"], {"X": x})[0]  # type: ignore[no-any-return]


def test_predict_with_tensor_content(server: ServerProcess, channel: grpc.Channel) -> None:
    x = digits()[0][:5]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["X"].CopyFrom(tf.make_tensor_proto(x, dtype=tf.float32))
    reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 10.0)
    assert reply.model_spec.version.value == 1
    assert reply.model_spec.signature_name == "serving_default"
    probabilities = tf.make_ndarray(reply.outputs["probabilities"])
    np.testing.assert_allclose(probabilities, in_process(server, x), rtol=1e-6)


def test_predict_with_typed_values(server: ServerProcess, channel: grpc.Channel) -> None:
    """The typed ``float_val`` field instead of ``tensor_content``, built by hand as older clients do."""
    x = digits()[0][5:7]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.model_spec.signature_name = "serving_default"
    tensor = request.inputs["X"]
    tensor.dtype = tf.float32.as_datatype_enum
    tensor.tensor_shape.dim.add(size=2)
    tensor.tensor_shape.dim.add(size=64)
    tensor.float_val.extend(x.reshape(-1).tolist())
    reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 10.0)
    np.testing.assert_allclose(
        tf.make_ndarray(reply.outputs["probabilities"]), in_process(server, x), rtol=1e-6
    )


def test_get_model_metadata(channel: grpc.Channel) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digits"
    reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, 10.0)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert reply.metadata["signature_def"].Unpack(signatures)
    default = signatures.signature_def["serving_default"]
    assert default.method_name == "tensorflow/serving/predict"
    x = default.inputs["X"]
    assert tf.dtypes.as_dtype(x.dtype) == tf.float32
    assert [d.size for d in x.tensor_shape.dim] == [-1, 64]
    assert [d.size for d in default.outputs["probabilities"].tensor_shape.dim] == [-1, 10]


def test_get_model_status(channel: grpc.Channel) -> None:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "digits"
    reply = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, 10.0)
    (status,) = reply.model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0
    missing = get_model_status_pb2.GetModelStatusRequest()
    missing.model_spec.name = "nosuch"
    with pytest.raises(grpc.RpcError) as error:
        model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(missing, 10.0)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_classify_with_tf_examples(channel: grpc.Channel) -> None:
    x, y = digits()
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "classifier"
    for row in x[:4]:
        example = tf.train.Example(
            features=tf.train.Features(
                feature={"X": tf.train.Feature(float_list=tf.train.FloatList(value=row))}
            )
        )
        request.input.example_list.examples.add().CopyFrom(example)
    reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, 10.0)
    assert len(reply.result.classifications) == 4
    best = [max(c.classes, key=lambda k: k.score).label for c in reply.result.classifications]
    assert best == [str(label) for label in y[:4]]
