"""End to end: a real ``inferd serve`` process, called over HTTP with ``requests`` the way a
notebook written for TensorFlow Serving calls it, checked against in-process predictions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests

from inferd._proto import model_service_pb2 as ms
from inferd._proto import model_service_pb2_grpc as ms_grpc
from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from tests.conftest import ServerProcess, launch
from tests.models import (
    digits,
    digits_classifier,
    write_onnx_digits,
    write_onnx_two_inputs,
    write_python_model,
    write_sklearn_digits,
    write_sklearn_regressor,
)

HEADERS = {"content-type": "application/json"}
OK = {"error_code": "OK", "error_message": ""}


def rows(start: int, stop: int) -> np.ndarray:
    """Digits rows as float64, the dtype of the sklearn signatures (the server casts to it)."""
    return digits()[0][start:stop].astype(np.float64)


def post(server: ServerProcess, path: str, document: Any) -> requests.Response:
    return requests.post(server.url + path, data=json.dumps(document), headers=HEADERS, timeout=10)


def get(server: ServerProcess, path: str) -> requests.Response:
    return requests.get(server.url + path, timeout=10)


def ok_json(response: requests.Response) -> Any:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return json.loads(response.text)


# --- the notebook server: --model_name / --model_base_path, two versions, two labels -------------


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``digits_model``: version 1 a skops classifier, version 2 the same classifier as ONNX."""
    base = tmp_path_factory.mktemp("notebook") / "digits_model"
    write_sklearn_digits(base / "1")
    write_onnx_digits(base / "2")
    (base / "inferd.toml").write_text("[version_policy]\nall = true\n\n[labels]\nstable = 1\ncanary = 2\n")
    return base


@pytest.fixture(scope="module")
def notebook(digits_base: Path) -> Iterator[ServerProcess]:
    server = launch(digits_base.parent, "--model_name=digits_model", f"--model_base_path={digits_base}")
    yield server
    server.stop()


def onnx_run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the server runs it
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"X": x}), strict=True))


def test_notebook_flow_matches_onnxruntime_exactly(notebook: ServerProcess, digits_base: Path) -> None:
    x, _ = digits()
    url = notebook.url
    data = json.dumps({"signature_name": "serving_default", "instances": x[0:3].tolist()})
    r = requests.post(
        url + "/v1/models/digits_model:predict", data=data, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    # sent whole with its length, as TF Serving does, not in chunks
    assert r.headers["content-length"] == str(len(r.content))
    assert "transfer-encoding" not in r.headers
    predictions = json.loads(r.text)["predictions"]

    expected = onnx_run(digits_base / "2" / "model.onnx", x[0:3])
    assert expected["probabilities"].dtype == np.float32
    assert [sorted(p) for p in predictions] == [["label", "probabilities"]] * 3
    assert [p["label"] for p in predictions] == expected["label"].tolist()
    assert all(type(p["label"]) is int for p in predictions)
    # float32 outputs must round-trip through their JSON text, bit for bit
    for served, wanted in zip(predictions, expected["probabilities"], strict=True):
        assert [np.float32(v) for v in served["probabilities"]] == list(wanted)


def test_notebook_flow_on_the_sklearn_version_matches_predict(notebook: ServerProcess) -> None:
    x, _ = digits()
    data = json.dumps({"signature_name": "serving_default", "instances": x[0:3].tolist()})
    expected = digits_classifier().predict(rows(0, 3)).tolist()  # type: ignore[attr-defined]
    for path in ("versions/1", "labels/stable"):
        r = requests.post(
            f"{notebook.url}/v1/models/digits_model/{path}:predict",
            data=data,
            headers={"content-type": "application/json"},
        )
        assert json.loads(r.text)["predictions"] == expected
    # the canary label names the ONNX version, whose response has two outputs per instance
    canary = ok_json(
        post(notebook, "/v1/models/digits_model/labels/canary:predict", {"instances": [x[0].tolist()]})
    )
    assert [p["label"] for p in canary["predictions"]] == expected[:1]


def test_status_lists_versions_highest_first(notebook: ServerProcess) -> None:
    available = [
        {"version": "2", "state": "AVAILABLE", "status": OK},
        {"version": "1", "state": "AVAILABLE", "status": OK},
    ]
    assert ok_json(get(notebook, "/v1/models/digits_model")) == {"model_version_status": available}
    assert ok_json(get(notebook, "/v1/models/digits_model/versions/1")) == {
        "model_version_status": available[1:]
    }
    # TF Serving's routes are case-insensitive
    assert ok_json(get(notebook, "/V1/Models/digits_model/Versions/2")) == {
        "model_version_status": available[:1]
    }


def test_status_of_a_label_lists_every_version_as_tf_serving_does(notebook: ServerProcess) -> None:
    """TF Serving's GetModelStatus reads only a version number, never the label (REST and gRPC):
    a label, known or not, answers every version, highest first."""
    available = [
        {"version": "2", "state": "AVAILABLE", "status": OK},
        {"version": "1", "state": "AVAILABLE", "status": OK},
    ]
    for label in ("stable", "canary", "nosuch"):
        assert ok_json(get(notebook, f"/v1/models/digits_model/labels/{label}")) == {
            "model_version_status": available
        }
    with grpc.insecure_channel(notebook.grpc_target) as channel:
        stub = ms_grpc.ModelServiceStub(channel)
        for label in ("stable", "canary", "nosuch"):
            spec = ps.ModelSpec(name="digits_model", version_label=label)
            reply = stub.GetModelStatus(ms.GetModelStatusRequest(model_spec=spec), timeout=10)
            assert [s.version for s in reply.model_version_status] == [2, 1]
            assert {s.state for s in reply.model_version_status} == {ms.ModelVersionStatus.AVAILABLE}
        spec = ps.ModelSpec(name="digits_model")
        spec.version.value = 1
        reply = stub.GetModelStatus(ms.GetModelStatusRequest(model_spec=spec), timeout=10)
        assert [s.version for s in reply.model_version_status] == [1]
        spec.version.value = 7
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetModelStatus(ms.GetModelStatusRequest(model_spec=spec), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert missing.value.details() == "Could not find version 7 of model digits_model"
    # the label still chooses the version of the metadata, and an unknown one there is refused
    assert (
        ok_json(get(notebook, "/v1/models/digits_model/labels/stable/metadata"))["model_spec"]["version"]
        == "1"
    )
    assert get(notebook, "/v1/models/digits_model/labels/nosuch/metadata").status_code == 400


def tensor(dtype: str, *dims: int) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False},
    }


def test_metadata_of_the_onnx_version(notebook: ServerProcess) -> None:
    meta = ok_json(get(notebook, "/v1/models/digits_model/metadata"))
    assert meta["model_spec"] == {"name": "digits_model", "signature_name": "", "version": "2"}
    assert list(meta["metadata"]) == ["signature_def"]
    signatures = meta["metadata"]["signature_def"]["signature_def"]
    assert list(signatures) == ["serving_default"]
    assert signatures["serving_default"] == {
        "inputs": {"X": {**tensor("DT_FLOAT", -1, 64), "name": "X"}},
        "outputs": {
            "label": {**tensor("DT_INT64", -1), "name": "label"},
            "probabilities": {**tensor("DT_FLOAT", -1, 10), "name": "probabilities"},
        },
        "method_name": "tensorflow/serving/predict",
        "defaults": {},
    }
    assert ok_json(get(notebook, "/v1/models/digits_model/labels/canary/metadata")) == meta


def test_metadata_of_the_sklearn_version(notebook: ServerProcess) -> None:
    for path in ("versions/1", "labels/stable"):
        meta = ok_json(get(notebook, f"/v1/models/digits_model/{path}/metadata"))
        assert meta["model_spec"] == {"name": "digits_model", "signature_name": "", "version": "1"}
        signatures = meta["metadata"]["signature_def"]["signature_def"]
        assert sorted(signatures) == ["classify", "predict_proba", "serving_default"]
        inputs = {"inputs": {**tensor("DT_DOUBLE", -1, 64), "name": "inputs"}}
        assert signatures["serving_default"] == {
            "inputs": inputs,
            "outputs": {"predictions": {**tensor("DT_INT64", -1), "name": "predictions"}},
            "method_name": "tensorflow/serving/predict",
            "defaults": {},
        }
        assert signatures["predict_proba"]["outputs"] == {
            "probabilities": {**tensor("DT_DOUBLE", -1, 10), "name": "probabilities"}
        }
        assert signatures["classify"]["method_name"] == "tensorflow/serving/classify"
        assert signatures["classify"]["inputs"] == inputs
        assert signatures["classify"]["outputs"] == {
            "classes": {**tensor("DT_INT64", -1, 10), "name": "classes"},
            "scores": {**tensor("DT_DOUBLE", -1, 10), "name": "scores"},
        }


def test_one_input_row_and_columnar_formats(notebook: ServerProcess, digits_base: Path) -> None:
    x, _ = digits()
    expected = onnx_run(digits_base / "2" / "model.onnx", x[5:7])
    # columnar, several outputs: {"outputs": {name: whole tensor}}
    columnar = ok_json(post(notebook, "/v1/models/digits_model:predict", {"inputs": x[5:7].tolist()}))
    assert sorted(columnar) == ["outputs"]
    assert columnar["outputs"]["label"] == expected["label"].tolist()
    assert np.array_equal(
        np.array(columnar["outputs"]["probabilities"], np.float32), expected["probabilities"]
    )
    # row, several outputs: one object per instance, each holding that instance's slice
    row = ok_json(post(notebook, "/v1/models/digits_model:predict", {"instances": x[5:7].tolist()}))
    assert row == {
        "predictions": [
            {
                "label": columnar["outputs"]["label"][i],
                "probabilities": columnar["outputs"]["probabilities"][i],
            }
            for i in range(2)
        ]
    }
    # one output: the bare tensor under "outputs" / the list over instances under "predictions"
    labels = digits_classifier().predict(rows(5, 7)).tolist()  # type: ignore[attr-defined]
    v1 = "/v1/models/digits_model/versions/1:predict"
    assert ok_json(post(notebook, v1, {"inputs": x[5:7].tolist()})) == {"outputs": labels}
    assert ok_json(post(notebook, v1, {"instances": x[5:7].tolist()})) == {"predictions": labels}
    # the server takes the JSON whatever Content-Type says, as TF Serving does
    r = requests.post(notebook.url + v1, data=json.dumps({"instances": x[5:6].tolist()}), timeout=10)
    assert ok_json(r) == {"predictions": labels[:1]}


def test_predict_proba_signature_by_name(notebook: ServerProcess) -> None:
    x, _ = digits()
    expected = digits_classifier().predict_proba(rows(10, 13)).tolist()  # type: ignore[attr-defined]
    body = {"signature_name": "predict_proba", "instances": x[10:13].tolist()}
    assert ok_json(post(notebook, "/v1/models/digits_model/versions/1:predict", body)) == {
        "predictions": expected
    }
    body = {"signature_name": "predict_proba", "inputs": x[10:13].tolist()}
    assert ok_json(post(notebook, "/v1/models/digits_model/labels/stable:predict", body)) == {
        "outputs": expected
    }


# --- a repository folder of several models --------------------------------------------------


FAILURE = "secret-detail-7f3a at /srv/internal/weights.bin"


def write_two_output_regressor(version_dir: Path) -> None:
    import skops.io as sio
    from sklearn.linear_model import Ridge

    x, y = digits()
    version_dir.mkdir(parents=True)
    sio.dump(Ridge().fit(x, np.stack([y, -y], axis=1)), version_dir / "model.skops")


@pytest.fixture(scope="module")
def repo_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A repository folder (one sub-folder per model) and the regressor it serves."""
    models = tmp_path_factory.mktemp("repo") / "models"
    write_onnx_two_inputs(models / "pair" / "1")
    write_sklearn_digits(models / "classifier" / "1")
    regressor = write_sklearn_regressor(models / "regressor" / "3")
    write_two_output_regressor(models / "regressor2" / "1")
    write_python_model(
        models / "custom" / "1",
        """
        def load(self):
            self.factor = np.float32(2.0)

        def predict(self, inputs):
            return {"y": inputs["x"] * self.factor + np.float32(0.5)}
        """,
    )
    write_python_model(
        models / "broken" / "1",
        f"""
        def load(self):
            pass

        def predict(self, inputs):
            raise RuntimeError({FAILURE!r})
        """,
    )
    (models / "broken" / "inferd.toml").write_text("warmup = false\n")
    # Predict signatures whose outputs have the names of Regress and Classify but not their shapes.
    write_python_model(
        models / "outputs_and_more" / "1",
        """
        def load(self):
            pass

        def predict(self, inputs):
            x = inputs["x"]
            return {"outputs": x[:, 0], "extra": x[:, 1]}
        """,
        '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}], "outputs": ['
        '{"name": "outputs", "dtype": "float32", "shape": [-1]}, '
        '{"name": "extra", "dtype": "float32", "shape": [-1]}]}',
    )
    write_python_model(
        models / "flat_scores" / "1",
        """
        def load(self):
            pass

        def predict(self, inputs):
            return {"scores": inputs["x"][:, 0]}
        """,
        '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}], "outputs": ['
        '{"name": "scores", "dtype": "float32", "shape": [-1]}]}',
    )
    write_python_model(
        models / "with_scalar" / "1",
        """
        def load(self):
            pass

        def predict(self, inputs):
            return {"y": inputs["x"], "total": inputs["x"].sum()}
        """,
        '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}], "outputs": ['
        '{"name": "y", "dtype": "float32", "shape": [-1, 2]}, '
        '{"name": "total", "dtype": "float32", "shape": []}]}',
    )
    return models, regressor


@pytest.fixture(scope="module")
def repo(repo_models: tuple[Path, Any]) -> Iterator[ServerProcess]:
    models, _ = repo_models
    server = launch(models.parent, str(models))
    yield server
    server.stop()


def test_several_named_inputs_row_format(repo: ServerProcess) -> None:
    body = {"instances": [{"a": [1.0, 2.0, 3.0], "b": [10]}, {"a": [0.5, 0, -1.25], "b": [-2]}]}
    result = ok_json(post(repo, "/v1/models/pair:predict", body))
    assert result == {
        "predictions": [
            {"sum": [11.0, 12.0, 13.0], "count": 3},
            {"sum": [-1.5, -2.0, -3.25], "count": 3},
        ]
    }
    assert all(type(p["count"]) is int for p in result["predictions"])
    assert all(type(v) is float for p in result["predictions"] for v in p["sum"])


def test_several_named_inputs_columnar_format(repo: ServerProcess) -> None:
    body: dict[str, Any] = {"inputs": {"a": [[1, 2, 3], [4, 5, 6], [7, 8, 9]], "b": [[1], [2], [3]]}}
    assert ok_json(post(repo, "/v1/models/pair:predict", body)) == {
        "outputs": {"sum": [[2.0, 3.0, 4.0], [6.0, 7.0, 8.0], [10.0, 11.0, 12.0]], "count": [3, 3, 3]}
    }
    # extra keys in a columnar object are ignored, as in TF Serving
    body["inputs"]["unused"] = [1]
    assert ok_json(post(repo, "/v1/models/pair:predict", body))["outputs"]["count"] == [3, 3, 3]
    # columnar inputs may differ in dim 0 (here the model broadcasts), and so may the outputs
    body = {"inputs": {"a": [[1, 2, 3]], "b": [[10], [20]]}}
    assert ok_json(post(repo, "/v1/models/pair:predict", body)) == {
        "outputs": {"sum": [[11.0, 12.0, 13.0], [21.0, 22.0, 23.0]], "count": [3]}
    }


def test_pair_metadata_and_status(repo: ServerProcess) -> None:
    assert ok_json(get(repo, "/v1/models/pair")) == {
        "model_version_status": [{"version": "1", "state": "AVAILABLE", "status": OK}]
    }
    signature = ok_json(get(repo, "/v1/models/pair/versions/1/metadata"))["metadata"]["signature_def"][
        "signature_def"
    ]["serving_default"]
    assert signature["inputs"] == {
        "a": {**tensor("DT_FLOAT", -1, 3), "name": "a"},
        "b": {**tensor("DT_INT64", -1, 1), "name": "b"},
    }
    assert signature["outputs"] == {
        "sum": {**tensor("DT_FLOAT", -1, 3), "name": "sum"},
        "count": {**tensor("DT_INT64", -1), "name": "count"},
    }


def test_classify_gives_label_score_pairs(repo: ServerProcess) -> None:
    x = rows(20, 23)
    model = digits_classifier()
    scores = model.predict_proba(x)  # type: ignore[attr-defined]
    expected = [
        [[str(label), score] for label, score in zip(range(10), row, strict=True)] for row in scores.tolist()
    ]
    examples = [{"inputs": row} for row in x.tolist()]
    for body in ({"examples": examples}, {"signature_name": "classify", "examples": examples}):
        assert ok_json(post(repo, "/v1/models/classifier:classify", body)) == {"results": expected}
    best = [max(result, key=lambda pair: pair[1])[0] for result in expected]
    assert best == [str(label) for label in model.predict(x)]  # type: ignore[attr-defined]


def test_an_empty_signature_name_is_the_default_one(repo: ServerProcess) -> None:
    """As in TF Serving, ``"signature_name": ""`` is no name: predict takes serving_default,
    classify and regress the signature they take by default (it was a 400: no such signature)."""
    body = {"signature_name": "", "instances": [[1.0, 2.0]]}
    assert ok_json(post(repo, "/v1/models/custom:predict", body)) == {"predictions": [[2.5, 4.5]]}
    examples = [{"inputs": row} for row in rows(20, 21).tolist()]
    default = ok_json(post(repo, "/v1/models/classifier:classify", {"examples": examples}))
    body = {"signature_name": "", "examples": examples}
    assert ok_json(post(repo, "/v1/models/classifier:classify", body)) == default


def test_regress_gives_one_float_per_example(repo: ServerProcess, repo_models: tuple[Path, Any]) -> None:
    x = rows(30, 34)
    expected = repo_models[1].predict(x).tolist()
    examples = [{"inputs": row} for row in x.tolist()]
    for path in ("/v1/models/regressor:regress", "/v1/models/regressor/versions/3:regress"):
        result = ok_json(post(repo, path, {"examples": examples}))
        assert result == {"results": expected}
        assert all(type(v) is float for v in result["results"])
    body = {"signature_name": "regress", "examples": examples[:1]}
    assert ok_json(post(repo, "/v1/models/regressor:regress", body)) == {"results": expected[:1]}
    # the regressor's predict signature gives the same numbers under "predictions"
    assert ok_json(post(repo, "/v1/models/regressor:predict", {"instances": x.tolist()})) == {
        "predictions": expected
    }


def test_regress_refuses_several_values_per_example(repo: ServerProcess) -> None:
    x = rows(30, 32).tolist()
    r = post(repo, "/v1/models/regressor2:regress", {"examples": [{"inputs": row} for row in x]})
    assert r.status_code == 400, r.text
    assert "[batch_size] or [batch_size, 1] but got [2, 2]" in r.json()["error"]
    # :predict gives both values of each example
    predictions = ok_json(post(repo, "/v1/models/regressor2:predict", {"instances": x}))["predictions"]
    assert [len(p) for p in predictions] == [2, 2]
    assert [p[0] == pytest.approx(-p[1]) for p in predictions] == [True, True]


def test_regress_and_classify_refuse_outputs_of_other_shapes_as_invalid(repo: ServerProcess) -> None:
    """Not a 500: the outputs fit Predict, not the method asked for (TF Serving's words)."""
    examples = {"signature_name": "serving_default", "examples": [{"x": [1.0, 2.0]}]}
    regressed = post(repo, "/v1/models/outputs_and_more:regress", examples)
    assert regressed.status_code == 400, regressed.text
    assert "Expected one output Tensor" in regressed.json()["error"]
    classified = post(repo, "/v1/models/flat_scores:classify", examples)
    assert classified.status_code == 400, classified.text
    assert "Expected Tensor shape: [batch_size num_classes]" in classified.json()["error"]
    with grpc.insecure_channel(repo.grpc_target) as channel:
        stub = ps_grpc.PredictionServiceStub(channel)
        request = ps.RegressionRequest()
        request.model_spec.name = "outputs_and_more"
        request.model_spec.signature_name = "serving_default"
        example = request.input.example_list.examples.add()
        example.features.feature["x"].float_list.value.extend([1.0, 2.0])
        with pytest.raises(grpc.RpcError) as refused:
            stub.Regress(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Expected one output Tensor" in (refused.value.details() or "")


def test_custom_python_model(repo: ServerProcess) -> None:
    body = {"instances": [[1.0, 2.0], [-3.0, 0.25]]}
    assert ok_json(post(repo, "/v1/models/custom:predict", body)) == {
        "predictions": [[2.5, 4.5], [-5.5, 1.0]]
    }
    # float32 outputs are written in their shortest round-tripping form: 0.7, not 0.699999988...
    r = post(repo, "/v1/models/custom:predict", {"inputs": [[0.1, 0.2]]})
    assert r.text.replace(" ", "") == '{"outputs":[[0.7,0.9]]}'
    wanted = np.array([[0.1, 0.2]], np.float32) * np.float32(2.0) + np.float32(0.5)
    assert np.array(ok_json(r)["outputs"], np.float32).tolist() == wanted.tolist()


def test_a_scalar_output_is_one_bare_value(repo: ServerProcess) -> None:
    """As TF Serving writes a rank-0 output: a value, not a one-element list; the row format,
    which splits outputs by their first dimension, refuses it naming the output."""
    columns = ok_json(post(repo, "/v1/models/with_scalar:predict", {"inputs": [[1.0, 2.0], [3.0, 4.0]]}))
    assert columns == {"outputs": {"y": [[1.0, 2.0], [3.0, 4.0]], "total": 10.0}}
    r = post(repo, "/v1/models/with_scalar:predict", {"instances": [[1.0, 2.0]]})
    assert r.status_code == 400, r.text
    assert "Tensor name: total has no shape information" in r.json()["error"]


def test_failing_python_model_gives_500_without_internals(repo: ServerProcess) -> None:
    r = post(repo, "/v1/models/broken:predict", {"instances": [[1.0, 2.0]]})
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"]
    assert "broken" in body["error"]
    for leak in ("secret-detail", "/srv/internal", "RuntimeError", "Traceback", "model.py"):
        assert leak not in body["error"]
    # the details go to the server log instead
    repo.wait_for(lambda: FAILURE in repo.log(), "the failure to be logged", timeout_s=10)
    # the version stays loaded, and the server keeps serving every model
    assert repo.status("broken") == {"1": "AVAILABLE"}
    assert post(repo, "/v1/models/broken:predict", {"instances": [[1.0, 2.0]]}).status_code == 500
    assert ok_json(post(repo, "/v1/models/custom:predict", {"instances": [[1.0, 1.0]]})) == {
        "predictions": [[2.5, 2.5]]
    }
    assert ok_json(post(repo, "/v1/models/pair:predict", {"inputs": {"a": [[0, 0, 0]], "b": [[1]]}})) == {
        "outputs": {"sum": [[1.0, 1.0, 1.0]], "count": [3]}
    }
