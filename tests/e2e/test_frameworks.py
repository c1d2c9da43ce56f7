"""End to end, one framework at a time: small models built here, served by one real ``inferd serve``
process from a repository, called over REST and compared with the framework's own in-process
outputs; beside them, a corrupt file per runtime, which must end in END with a readable error
while every other model serves."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.conftest import ServerProcess, launch
from tests.models import (
    digits,
    write_keras,
    write_lightgbm,
    write_sklearn_digits,
    write_tf_saved_model,
    write_tflite,
    write_torch_export,
    write_torchscript,
    write_xgboost,
)

HEADERS = {"content-type": "application/json"}

CORRUPT = {
    "bad_xgboost": "model.ubj",
    "bad_lightgbm": "model.txt",
    "bad_torchscript": "model.pt",
    "bad_torch_export": "model.pt2",
    "bad_savedmodel": "saved_model.pb",
    "bad_keras": "model.keras",
    "bad_tflite": "model.tflite",
}
"""Model name -> the file that holds garbage in its version 1."""

TORCH_SIGNATURE = """
[signature]
inputs = [
  { name = "x", dtype = "float32", shape = [-1, 64] },
  { name = "weight", dtype = "float32", shape = [-1, 1] },
]
"""


def write_repository(models: Path) -> dict[str, Any]:
    """Every framework's models under ``models/``; returns their in-process predictors."""
    reference: dict[str, Any] = {
        "xgb_classifier": write_xgboost(models / "xgb_classifier" / "1", "multi:softprob"),
        "xgb_regressor": write_xgboost(models / "xgb_regressor" / "1", "reg:squarederror"),
        "lgb_binary": write_lightgbm(models / "lgb_binary" / "1", "binary"),
        "lgb_regressor": write_lightgbm(models / "lgb_regressor" / "1", "regression"),
        "torchscript": write_torchscript(models / "torchscript" / "1"),
        "torch_export": write_torch_export(models / "torch_export" / "1"),
        "savedmodel": write_tf_saved_model(models / "savedmodel" / "1"),
        "keras": write_keras(models / "keras" / "1"),
        "tflite": write_tflite(models / "tflite" / "1"),
    }
    (models / "torchscript" / "inferd.toml").write_text(TORCH_SIGNATURE)
    write_torchscript(models / "torch_any_shape" / "1")  # no [signature]: any shape reaches torch
    write_torch_export(models / "torch_cpu" / "1")
    (models / "torch_cpu" / "inferd.toml").write_text('device = "cpu"\n\n[torch]\nnum_threads = 2\n')
    write_torch_export(models / "torch_cuda" / "1")
    (models / "torch_cuda" / "inferd.toml").write_text('device = "cuda:0"\n')
    write_sklearn_digits(models / "sklearn_cuda" / "1")
    (models / "sklearn_cuda" / "inferd.toml").write_text('device = "cuda"\n')
    for name, file in CORRUPT.items():
        (models / name / "1").mkdir(parents=True)
        (models / name / "1" / file).write_bytes(b"\x00not a model file\xff" * 8)
    # A torch.save()d state dict is a real torch file, but not a program inferd can run.
    import torch

    (models / "torch_state_dict" / "1").mkdir(parents=True)
    torch.save({"weight": torch.zeros(2)}, models / "torch_state_dict" / "1" / "model.pt")
    return reference


SERVING = ("xgb_classifier", "xgb_regressor", "lgb_binary", "lgb_regressor", "torchscript")
SERVING += ("torch_export", "savedmodel", "keras", "tflite", "torch_cpu", "torch_any_shape")
FAILING = (*CORRUPT, "torch_state_dict", "torch_cuda", "sklearn_cuda")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    models = tmp_path_factory.mktemp("frameworks") / "models"
    return models, write_repository(models)


@pytest.fixture(scope="module")
def server(repository: tuple[Path, dict[str, Any]]) -> Iterator[ServerProcess]:
    models, _ = repository
    server = launch(models.parent, str(models))

    def settled() -> bool:
        states = {name: server.status(name).get("1") for name in (*SERVING, *FAILING)}
        return all(states[n] == "AVAILABLE" for n in SERVING) and all(states[n] == "END" for n in FAILING)

    try:
        server.wait_for(settled, "every framework model to load or fail", timeout_s=180)
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(repository: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    return repository[1]


def post(server: ServerProcess, path: str, document: Any) -> Any:
    response = requests.post(server.url + path, data=json.dumps(document), headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def error(server: ServerProcess, path: str, document: Any, status: int) -> str:
    response = requests.post(server.url + path, data=json.dumps(document), headers=HEADERS, timeout=30)
    assert response.status_code == status, response.text
    message: str = response.json()["error"]
    return message


def as_f32(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def rows(start: int, stop: int) -> np.ndarray:
    return digits()[0][start:stop]


def metadata(server: ServerProcess, name: str) -> dict[str, Any]:
    response = requests.get(f"{server.url}/v1/models/{name}/metadata", timeout=10)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


# --- XGBoost and LightGBM -------------------------------------------------------------------------


def test_xgboost_classifier_predicts_classifies_and_gives_probabilities(
    server: ServerProcess, reference: dict[str, Any]
) -> None:
    x = rows(700, 705)
    proba = reference["xgb_classifier"](x)
    served = post(server, "/v1/models/xgb_classifier:predict", {"instances": x.tolist()})
    assert served == {"predictions": proba.argmax(axis=1).tolist()}
    body = {"signature_name": "predict_proba", "instances": x.tolist()}
    np.testing.assert_array_equal(
        as_f32(post(server, "/v1/models/xgb_classifier:predict", body)["predictions"]), proba
    )
    results = post(
        server, "/v1/models/xgb_classifier:classify", {"examples": [{"inputs": r} for r in x.tolist()]}
    )
    assert [[label for label, _ in result] for result in results["results"]] == [
        [str(k) for k in range(10)]
    ] * 5
    np.testing.assert_array_equal(as_f32([[s for _, s in result] for result in results["results"]]), proba)


def test_xgboost_regressor_regresses(server: ServerProcess, reference: dict[str, Any]) -> None:
    x = rows(700, 704)
    expected = reference["xgb_regressor"](x)
    results = post(
        server, "/v1/models/xgb_regressor:regress", {"examples": [{"inputs": r} for r in x.tolist()]}
    )
    np.testing.assert_array_equal(as_f32(results["results"]), expected)
    served = post(server, "/v1/models/xgb_regressor:predict", {"instances": x.tolist()})
    np.testing.assert_array_equal(as_f32(served["predictions"]), expected)


def test_lightgbm_binary_classifier_and_regressor(server: ServerProcess, reference: dict[str, Any]) -> None:
    x = rows(700, 706).astype(np.float64)
    p = reference["lgb_binary"](x)
    body = {"signature_name": "predict_proba", "instances": x.tolist()}
    served = np.asarray(post(server, "/v1/models/lgb_binary:predict", body)["predictions"])
    np.testing.assert_array_equal(served, np.stack([1 - p, p], axis=1))
    labels = post(server, "/v1/models/lgb_binary:predict", {"instances": x.tolist()})["predictions"]
    assert labels == (p > 0.5).astype(int).tolist()
    results = post(
        server, "/v1/models/lgb_regressor:regress", {"examples": [{"inputs": r} for r in x.tolist()]}
    )
    np.testing.assert_array_equal(np.asarray(results["results"]), reference["lgb_regressor"](x))


def test_booster_metadata_declares_features_and_classes(server: ServerProcess) -> None:
    signatures = metadata(server, "xgb_classifier")["metadata"]["signature_def"]["signature_def"]
    assert sorted(signatures) == ["classify", "predict_proba", "serving_default"]
    assert signatures["classify"]["method_name"] == "tensorflow/serving/classify"
    dims = [d["size"] for d in signatures["serving_default"]["inputs"]["inputs"]["tensor_shape"]["dim"]]
    assert dims == ["-1", "64"]
    assert signatures["predict_proba"]["outputs"]["probabilities"]["dtype"] == "DT_FLOAT"
    lgb = metadata(server, "lgb_regressor")["metadata"]["signature_def"]["signature_def"]
    assert sorted(lgb) == ["regress", "serving_default"]
    assert lgb["regress"]["method_name"] == "tensorflow/serving/regress"


# --- PyTorch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["torchscript", "torch_export", "torch_cpu"])
def test_torch_programs_match_torch_in_process(
    server: ServerProcess, reference: dict[str, Any], name: str
) -> None:
    x = rows(0, 4)
    weight = np.array([[1.0], [2.0], [0.5], [3.0]], dtype=np.float32)
    expected = reference["torch_export" if name == "torch_cpu" else name](x, weight)
    body = {"inputs": {"x": x.tolist(), "weight": weight.tolist()}}
    outputs = post(server, f"/v1/models/{name}:predict", body)["outputs"]
    np.testing.assert_array_equal(as_f32(outputs["output_0"]), expected[0])
    np.testing.assert_array_equal(as_f32(outputs["output_1"]), expected[1])


def test_torch_signatures_come_from_the_program_or_inferd_toml(server: ServerProcess) -> None:
    for name in ("torch_export", "torchscript"):  # export knows shapes; TorchScript's come from inferd.toml
        signature = metadata(server, name)["metadata"]["signature_def"]["signature_def"]["serving_default"]
        x = signature["inputs"]["x"]
        assert x["dtype"] == "DT_FLOAT"
        assert [d["size"] for d in x["tensor_shape"]["dim"]] == ["-1", "64"]
        assert sorted(signature["outputs"]) == ["output_0", "output_1"]
    exported = metadata(server, "torch_export")["metadata"]["signature_def"]["signature_def"][
        "serving_default"
    ]
    assert [d["size"] for d in exported["outputs"]["output_0"]["tensor_shape"]["dim"]] == ["-1", "10"]
    ts = metadata(server, "torchscript")["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert ts["outputs"]["output_0"]["tensor_shape"] == {"dim": [], "unknown_rank": True}


def test_torch_rejects_a_wrong_shape_naming_the_input(server: ServerProcess) -> None:
    body = {"inputs": {"x": np.zeros((2, 63)).tolist(), "weight": [[1.0], [1.0]]}}
    message = error(server, "/v1/models/torch_export:predict", body, 400)
    assert "input 'x': expected FP32 [-1, 64], got FP32 [2, 63]" in message


def test_a_torch_error_fails_only_its_own_request(server: ServerProcess) -> None:
    weight = [[1.0], [1.0]]
    bad = {"inputs": {"x": np.zeros((2, 5)).tolist(), "weight": weight}}
    assert error(server, "/v1/models/torch_any_shape:predict", bad, 400).startswith(
        "torch rejected the input"
    )
    good = {"inputs": {"x": np.zeros((2, 64)).tolist(), "weight": weight}}
    assert len(post(server, "/v1/models/torch_any_shape:predict", good)["outputs"]["output_1"]) == 2


# --- TensorFlow SavedModel, Keras, TFLite -----------------------------------------------------------


def test_savedmodel_serves_every_signature_with_strings(
    server: ServerProcess, reference: dict[str, Any]
) -> None:
    import tensorflow as tf

    texts = [b"caf\xc3\xa9", b"ab\x00c", b""]
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    body = {"inputs": {"text": [{"b64": base64.b64encode(t).decode()} for t in texts], "x": x.tolist()}}
    outputs = post(server, "/v1/models/savedmodel:predict", body)["outputs"]
    expected = {
        k: v.numpy()
        for k, v in reference["savedmodel"]["serving_default"](
            text=tf.constant(texts), x=tf.constant(x)
        ).items()
    }
    assert outputs["length"] == expected["length"].tolist()
    assert [s.encode() for s in outputs["upper"]] == expected["upper"].tolist()
    np.testing.assert_array_equal(as_f32(outputs["scaled"]), expected["scaled"])
    doubled = post(
        server, "/v1/models/savedmodel:predict", {"signature_name": "double", "instances": x.tolist()}
    )
    np.testing.assert_array_equal(as_f32(doubled["predictions"]), x * 2)


def test_savedmodel_metadata_is_built_from_its_signatures(server: ServerProcess) -> None:
    document = metadata(server, "savedmodel")
    signatures = document["metadata"]["signature_def"]["signature_def"]
    assert sorted(signatures) == ["double", "serving_default"]
    default = signatures["serving_default"]
    assert {k: v["dtype"] for k, v in default["inputs"].items()} == {"text": "DT_STRING", "x": "DT_FLOAT"}
    assert {k: v["dtype"] for k, v in default["outputs"].items()} == {
        "length": "DT_INT32",
        "scaled": "DT_FLOAT",
        "upper": "DT_STRING",
    }
    assert [d["size"] for d in default["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "3"]
    assert "device" not in document  # TF Serving's document has TF Serving's fields only
    v2 = requests.get(f"{server.url}/v2/models/savedmodel", timeout=10).json()
    assert v2["platform"] == "tensorflow_savedmodel"
    assert v2["parameters"] == {"device": "cpu"}


def test_savedmodel_over_grpc_with_tensorflows_own_client(
    server: ServerProcess, reference: dict[str, Any]
) -> None:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    texts = np.array([b"grpc", b"\xff\x00"], dtype=object)
    x = np.ones((2, 3), np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "savedmodel"
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts, dtype=tf.string))
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 30.0)
    expected = reference["savedmodel"]["serving_default"](text=tf.constant(texts), x=tf.constant(x))
    for name in ("length", "upper", "scaled"):
        np.testing.assert_array_equal(tf.make_ndarray(reply.outputs[name]), expected[name].numpy())


@pytest.mark.parametrize("name", ["keras", "tflite"])
def test_keras_and_tflite_match_keras_in_process(
    server: ServerProcess, reference: dict[str, Any], name: str
) -> None:
    images = rows(10, 13).reshape(3, 8, 8) / 16.0
    expected = reference[name].predict(images, verbose=0)
    served = as_f32(post(server, f"/v1/models/{name}:predict", {"instances": images.tolist()})["predictions"])
    if name == "keras":
        np.testing.assert_array_equal(served, expected)
    else:  # the TFLite kernels round differently from TensorFlow's in the last bits
        np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)


def test_tensorflow_rejects_a_wrong_dtype_naming_the_input(server: ServerProcess) -> None:
    body = {"inputs": {"text": [1, 2], "x": [[1.0, 2.0, 3.0]] * 2}}
    message = error(server, "/v1/models/savedmodel:predict", body, 400)
    assert "input 'text': expected BYTES [-1], got INT64 [2]" in message


# --- failures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bad_xgboost", "xgboost could not load model.ubj"),
        ("bad_lightgbm", "lightgbm could not load model.txt"),
        ("bad_torchscript", "torch could not load model.pt"),
        ("bad_torch_export", "torch could not load model.pt2"),
        ("torch_state_dict", "serve TorchScript saved with torch.jit.save"),
        ("bad_savedmodel", "tensorflow could not load the SavedModel"),
        ("bad_keras", "keras could not load model.keras"),
        ("bad_tflite", "LiteRT could not load model.tflite"),
        ("torch_cuda", "device 'cuda:0' asks for CUDA, but torch sees no CUDA GPU"),
        ("sklearn_cuda", "the sklearn runtime runs on the CPU only"),
    ],
)
def test_a_bad_version_ends_with_a_readable_error(server: ServerProcess, name: str, expected: str) -> None:
    response = requests.get(f"{server.url}/v1/models/{name}", timeout=10)
    (status,) = response.json()["model_version_status"]
    assert status["state"] == "END"
    assert expected in status["status"]["error_message"]
    missing = error(server, f"/v1/models/{name}:predict", {"instances": [[0.0]]}, 404)
    assert name in missing


def test_the_server_serves_every_good_model_beside_the_bad_ones(server: ServerProcess) -> None:
    assert all(server.status(name) == {"1": "AVAILABLE"} for name in SERVING)
    assert server.process.poll() is None
