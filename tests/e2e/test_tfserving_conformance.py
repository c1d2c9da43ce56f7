"""inferd as a drop-in for ``tensorflow_model_server``: every flag it lists, TensorFlow models
loaded as TF Serving loads them (TF1 method names, graph tensor names, shapes judged by the
graph, warm-up files, TFLite files without signatures), and TF Serving's answers on the wire.

The models are built here with TensorFlow's own APIs (``tests/models.py``); the clients are the
``tensorflow-serving-api`` stubs and ``requests``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from inferd._proto.profiler_service_pb2 import ProfileRequest
from inferd._proto.profiler_service_pb2_grpc import ProfilerServiceStub
from tests.conftest import ServerProcess, launch
from tests.models import write_tf1_half_plus_two, write_tf2_half_plus_two, write_tflite_without_signatures

TFSERVING_FLAGS: dict[str, str] = {
    # Every flag of tensorflow_model_server's main.cc, in its order, with a value to give it
    # (port, rest_api_port and model_config_file are set by the test itself).
    "grpc_socket_path": "{socket}",
    "rest_api_num_threads": "2",
    "rest_api_timeout_in_ms": "30000",
    "rest_api_enable_cors_support": "true",
    "enable_batching": "true",
    "allow_version_labels_for_unavailable_models": "false",
    "batching_parameters_file": "{batching}",
    "enable_per_model_batching_parameters": "false",
    "model_config_file_poll_wait_seconds": "0",
    "model_name": "ignored_with_a_config_file",
    "model_base_path": "{base}",
    "num_load_threads": "0",  # TF Serving's default: load in the manager's loop
    "num_unload_threads": "1",
    "max_num_load_retries": "5",
    "load_retry_interval_micros": "60000000",
    "file_system_poll_wait_seconds": "1",
    "flush_filesystem_caches": "true",
    "tensorflow_session_parallelism": "0",
    "tensorflow_session_config_file": "",
    "tensorflow_intra_op_parallelism": "1",
    "tensorflow_inter_op_parallelism": "1",
    "use_alts_credentials": "false",
    "ssl_config_file": "",
    "platform_config_file": "",
    "per_process_gpu_memory_fraction": "0",
    "saved_model_tags": "serve",
    "grpc_channel_arguments": "grpc.max_connection_age_ms=60000,grpc.lb_policy_name=grpclb",
    "grpc_max_threads": "8",
    "enable_model_warmup": "true",
    "num_request_iterations_for_warmup": "2",
    "monitoring_config_file": "{monitoring}",
    "remove_unused_fields_from_bundle_metagraph": "true",
    "prefer_tflite_model": "false",
    "num_tflite_pools": "1",
    "num_tflite_interpreters_per_pool": "1",
    "enable_signature_method_name_check": "false",
    "xla_cpu_compilation_enabled": "false",
    "xla_gpu_compilation_enabled": "false",
    "enable_profiler": "false",
    "thread_pool_factory_config_file": "",
    "mixed_precision": "",
    "skip_initialize_tpu": "true",
    "enable_grpc_healthcheck_service": "true",
    "enable_serialization_as_tensor_content": "false",
}
"""The flags main.cc declares besides port, rest_api_port, model_config_file and version."""

IMPLEMENTED = {
    "grpc_socket_path", "rest_api_num_threads", "rest_api_timeout_in_ms", "rest_api_enable_cors_support",
    "enable_batching", "batching_parameters_file", "model_config_file_poll_wait_seconds", "model_name",
    "model_base_path", "num_load_threads", "file_system_poll_wait_seconds", "tensorflow_session_parallelism",
    "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism", "ssl_config_file",
    "saved_model_tags", "grpc_channel_arguments", "enable_model_warmup", "num_request_iterations_for_warmup",
    "monitoring_config_file", "prefer_tflite_model", "enable_serialization_as_tensor_content",
    "enable_profiler",
}  # fmt: skip
"""Flags that change what inferd does; every other one is accepted with one 'no effect' line."""


def _config(path: Path, **models: Path) -> Path:
    entries = "".join(f'  config {{ name: "{name}" base_path: "{base}" }}\n' for name, base in models.items())
    path.write_text(f"model_config_list {{\n{entries}}}\n")
    return path


def _stub(target: str) -> Any:
    return prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(target))


def _predict_request(model: str, values: list[float], shape: list[int], signature: str = "") -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array(values, np.float32).reshape(shape)))
    return request


def _example(x: float) -> Any:
    return tf.train.Example(features=tf.train.Features(feature={"x": _float_feature(x)}))


def _float_feature(x: float) -> Any:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[x]))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tfs-models")
    write_tf1_half_plus_two(root / "tf1" / "123")
    write_tf2_half_plus_two(root / "tf2" / "1")
    write_tflite_without_signatures(root / "lite" / "7")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    config = _config(repo / "models.conf", tf1=repo / "tf1", tf2=repo / "tf2", lite=repo / "lite")
    process = launch(repo, f"--model_config_file={config}")
    process.wait_for(
        lambda: all(process.status(m) for m in ("tf1", "tf2", "lite")), "every model to load", 120
    )
    yield process
    process.stop()


def test_every_tensorflow_model_server_flag_is_accepted(repo: Path, tmp_path: Path) -> None:
    """The whole flag list of main.cc on one command line: the server starts and serves, the
    implemented flags work (Unix socket, CORS, TensorFlow tags and threads, batching), and each
    inert one is logged once as having no effect."""
    socket_dir = Path(
        tempfile.mkdtemp(prefix="tfs-flags-sock-", dir="/tmp")
    )  # short: socket paths are limited
    values = {
        "socket": str(socket_dir / "grpc.sock"),
        "batching": str(_write(tmp_path / "batching.txt", "max_batch_size { value: 8 }\n")),
        "base": str(repo / "tf1"),
        "monitoring": str(
            _write(tmp_path / "monitoring.txt", 'prometheus_config { enable: true, path: "/m" }\n')
        ),
    }
    args = [f"--{name}={value.format(**values)}" for name, value in TFSERVING_FLAGS.items()]
    config = _config(tmp_path / "models.conf", tf1=repo / "tf1")
    server = launch(tmp_path, f"--model_config_file={config}", *args)
    try:
        server.wait_for(lambda: server.status("tf1") == {"123": "AVAILABLE"}, "tf1 to load", 120)
        reply = _stub(f"unix:{values['socket']}").Predict(_predict_request("tf1", [2.0], [1, 1]), 30)
        assert list(reply.outputs["y"].float_val) == [3.0]
        preflight = requests.options(
            f"{server.url}/v1/models/tf1:predict", headers={"Origin": "http://example.com"}, timeout=10
        )
        assert preflight.status_code == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert requests.options(f"{server.url}/v1/models/tf1", timeout=10).status_code == 400
        answer = requests.post(f"{server.url}/v1/models/tf1:predict", json={"instances": [[1.0]]}, timeout=30)
        assert answer.json() == {"predictions": [[2.5]]}
        assert answer.headers["Access-Control-Allow-Methods"] == "POST, GET"
        assert "# TYPE" in requests.get(f"{server.url}/m", timeout=10).text
        profiler = ProfilerServiceStub(grpc.insecure_channel(server.grpc_target))
        with pytest.raises(grpc.RpcError) as unserved:  # --enable_profiler=false
            profiler.Profile(ProfileRequest(), timeout=10)
        assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
    log = server.log()
    for name in TFSERVING_FLAGS.keys() - IMPLEMENTED:
        assert log.count(f"--{name} has no effect in inferd: ") == 1, name
    for name in IMPLEMENTED:
        assert f"--{name} has no effect" not in log


def test_version_flag_prints_and_exits() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "inferd", "serve", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert "TensorFlow ModelServer" in done.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_graph_judges_shapes_not_the_declaration(server: ServerProcess) -> None:
    """``x`` is declared [-1, 1]; as in TF Serving, [3], [2, 2] and a gRPC [1] are computed."""
    for name in ("tf1", "tf2"):
        url = f"{server.url}/v1/models/{name}:predict"
        flat = requests.post(url, json={"instances": [2.0, 3.0, 4.0]}, timeout=30)
        assert flat.status_code == 200, flat.text
        assert flat.json() == {"predictions": [3.0, 3.5, 4.0]}
        square = requests.post(url, json={"instances": [[1.0, 2.0], [3.0, 4.0]]}, timeout=30)
        assert square.json() == {"predictions": [[2.5, 3.0], [3.5, 4.0]]}
        reply = _stub(server.grpc_target).Predict(_predict_request(name, [2.0], [1]), 30)
        assert list(reply.outputs["y"].tensor_shape.dim[0:1]) == [reply.outputs["y"].tensor_shape.dim[0]]
        assert [d.size for d in reply.outputs["y"].tensor_shape.dim] == [1]


def test_a_refusal_by_the_graph_is_invalid_argument_with_its_message(server: ServerProcess) -> None:
    answer = requests.post(
        f"{server.url}/v1/models/tf2:predict",
        json={"signature_name": "matmul", "instances": [2.0]},
        timeout=30,
    )
    assert answer.status_code == 400
    assert "MatMul" in answer.json()["error"]  # TensorFlow's message, naming the op that refused
    with pytest.raises(grpc.RpcError) as caught:
        _stub(server.grpc_target).Predict(_predict_request("tf2", [2.0], [1], "matmul"), 30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_outputs_fill_typed_fields(server: ServerProcess) -> None:
    reply = _stub(server.grpc_target).Predict(_predict_request("tf1", [2.0, 4.0], [2, 1]), 30)
    y = reply.outputs["y"]
    assert y.dtype == tf.float32.as_datatype_enum
    assert list(y.float_val) == [3.0, 4.0]
    assert y.tensor_content == b""


def test_tensor_content_on_request(repo: Path, tmp_path: Path) -> None:
    config = _config(tmp_path / "models.conf", tf1=repo / "tf1")
    server = launch(tmp_path, f"--model_config_file={config}", "--enable_serialization_as_tensor_content")
    try:
        server.wait_for(lambda: server.status("tf1") == {"123": "AVAILABLE"}, "tf1 to load", 120)
        y = _stub(server.grpc_target).Predict(_predict_request("tf1", [2.0], [1, 1]), 30).outputs["y"]
        assert not y.float_val
        assert tf.make_ndarray(y).tolist() == [[3.0]]
    finally:
        server.stop()


@pytest.mark.parametrize("name", ["tf1", "tf2"])
def test_regress_on_serialized_examples(server: ServerProcess, name: str) -> None:
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "regress_x_to_y"
    request.input.example_list.examples.extend([_example(2.0), _example(4.0)])
    reply = _stub(server.grpc_target).Regress(request, 30)
    assert [r.value for r in reply.result.regressions] == [3.0, 4.0]
    assert reply.model_spec.signature_name == "regress_x_to_y"
    rest = requests.post(
        f"{server.url}/v1/models/{name}:regress",
        json={"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}], "context": {}},
        timeout=30,
    )
    assert rest.json() == {"results": [3.0]}


def test_an_examples_feature_wins_over_the_contexts(server: ServerProcess) -> None:
    """TF Serving feeds a parser each example serialized after the context, so a feature in both
    is the example's: gRPC gave the context's (x = 3: 3.5), REST refused the request."""
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "tf1"
    request.model_spec.signature_name = "regress_x_to_y"
    request.input.example_list_with_context.context.CopyFrom(_example(3.0))
    request.input.example_list_with_context.examples.extend([_example(1.0), tf.train.Example()])
    reply = _stub(server.grpc_target).Regress(request, 30)
    assert [r.value for r in reply.result.regressions] == [2.5, 3.5]
    body = {"signature_name": "regress_x_to_y", "context": {"x": 3.0}, "examples": [{"x": 1.0}, {}]}
    rest = requests.post(f"{server.url}/v1/models/tf1:regress", json=body, timeout=30)
    assert rest.json() == {"results": [2.5, 3.5]}


def test_tf1_classify_and_multi_inference(server: ServerProcess) -> None:
    """A TF1 classify signature that gives scores only: labels are empty, as in TF Serving."""
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "tf1"
    request.model_spec.signature_name = "classify_x_to_y"
    request.input.example_list.examples.append(_example(2.0))
    reply = _stub(server.grpc_target).Classify(request, 30)
    assert [(c.label, c.score) for c in reply.result.classifications[0].classes] == [("", 3.0)]
    multi = inference_pb2.MultiInferenceRequest()
    for signature, method in (("regress_x_to_y", "regress"), ("classify_x_to_y", "classify")):
        task = multi.tasks.add()
        task.model_spec.name = "tf1"
        task.model_spec.signature_name = signature
        task.method_name = f"tensorflow/serving/{method}"
    multi.input.example_list.examples.append(_example(2.0))
    results = _stub(server.grpc_target).MultiInference(multi, 30).results
    assert results[0].regression_result.regressions[0].value == 3.0
    assert results[1].classification_result.classifications[0].classes[0].score == 3.0
    rest = requests.post(
        f"{server.url}/v1/models/tf1:classify",
        json={"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]},
        timeout=30,
    )
    assert rest.json() == {"results": [[["", 3.0]]]}


def test_metadata_is_tf_servings_document(server: ServerProcess) -> None:
    document = requests.get(f"{server.url}/v1/models/tf1/metadata", timeout=10).json()
    assert set(document) == {"model_spec", "metadata"}
    signatures = document["metadata"]["signature_def"]["signature_def"]
    assert signatures["serving_default"]["inputs"]["x"]["name"] == "x:0"
    assert signatures["classify_x_to_y"]["method_name"] == "tensorflow/serving/classify"
    assert signatures["regress_x_to_y"]["method_name"] == "tensorflow/serving/regress"
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "tf1"
    reply = _stub(server.grpc_target).GetModelMetadata(request, 30)
    defs = get_model_metadata_pb2.SignatureDefMap()
    reply.metadata["signature_def"].Unpack(defs)
    assert defs.signature_def["serving_default"].outputs["y"].name == "y:0"


def test_tflite_without_signatures_serves_serving_default(server: ServerProcess) -> None:
    reply = _stub(server.grpc_target).Predict(_predict_request("lite", [2.0], [1]), 30)
    assert list(reply.outputs["y"].float_val) == [3.0]
    rest = requests.post(
        f"{server.url}/v1/models/lite:predict", json={"instances": [[1.0], [2.0]]}, timeout=30
    )
    assert rest.json() == {"predictions": [[2.5], [3.0]]}


def _warmup_file(version_dir: Path, inputs: dict[str, np.ndarray]) -> None:
    folder = version_dir / "assets.extra"
    folder.mkdir(parents=True, exist_ok=True)
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.model_spec.name = "tf1"
    for name, value in inputs.items():
        log.predict_log.request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    regress = prediction_log_pb2.PredictionLog()
    regress.regress_log.request.model_spec.signature_name = "regress_x_to_y"
    regress.regress_log.request.input.example_list.examples.append(_example(1.0))
    with tf.io.TFRecordWriter(str(folder / "tf_serving_warmup_requests")) as writer:
        writer.write(log.SerializeToString())
        writer.write(regress.SerializeToString())


def test_warmup_requests_are_replayed_and_a_bad_one_fails_the_load(tmp_path: Path) -> None:
    write_tf1_half_plus_two(tmp_path / "good" / "1")
    _warmup_file(tmp_path / "good" / "1", {"x": np.array([[1.0]], np.float32)})
    write_tf1_half_plus_two(tmp_path / "bad" / "1")
    _warmup_file(tmp_path / "bad" / "1", {"x": np.array([["not a number"]], object)})
    config = _config(tmp_path / "models.conf", good=tmp_path / "good", bad=tmp_path / "bad")
    server = launch(tmp_path, f"--model_config_file={config}", "--num_request_iterations_for_warmup=3")
    try:
        server.wait_for(
            lambda: server.status("good") == {"1": "AVAILABLE"} and server.status("bad") == {"1": "END"},
            "good to load and bad to fail",
            120,
        )
        status = requests.get(f"{server.url}/v1/models/bad", timeout=10).json()
        assert "warm-up request 0 failed" in status["model_version_status"][0]["status"]["error_message"]
        assert "replayed 2 warm-up request(s)" in server.log()
        assert "3 time(s) each" in server.log()
    finally:
        server.stop()


def test_bad_model_config_file_uses_tf_servings_words(tmp_path: Path) -> None:
    config = _write(tmp_path / "bad.conf", "improperly formatted file")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferd",
            "serve",
            f"--model_config_file={config}",
            "--port=0",
            "--rest_api_port=0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in done.stderr


def test_unknown_label_is_400_on_the_v1_api(server: ServerProcess) -> None:
    answer = requests.post(
        f"{server.url}/v1/models/tf1/labels/nonexistent:predict", json={"instances": [[1.0]]}, timeout=10
    )
    assert answer.status_code == 400
    assert "Unrecognized servable version label" in answer.json()["error"]
    request = _predict_request("tf1", [1.0], [1, 1])
    request.model_spec.version_label = "nonexistent"
    with pytest.raises(grpc.RpcError) as caught:
        _stub(server.grpc_target).Predict(request, 30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_a_keras_3_model_saved_with_tf_saved_model_save_serves(tmp_path: Path) -> None:
    """Keras 3 networks written with ``tf.saved_model.save`` read variables that TF1's session
    loader never restores; such a SavedModel is served through TF2's loader instead, with the
    same signature document, and answers what Keras answers."""
    import keras

    keras.utils.set_random_seed(0)
    network = keras.Sequential(
        [keras.Input((4,), name="features"), keras.layers.Dense(3, activation="softmax")]
    )
    tf.saved_model.save(network, str(tmp_path / "net" / "1"))
    rows = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    expected = np.asarray(network(rows))
    server = launch(tmp_path, "--model_name=net", f"--model_base_path={tmp_path / 'net'}")
    try:
        server.wait_for(lambda: server.status("net") == {"1": "AVAILABLE"}, "the Keras 3 SavedModel")
        answer = requests.post(
            f"{server.url}/v1/models/net:predict", json={"instances": rows.tolist()}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["predictions"], expected, rtol=1e-5, atol=1e-6)
    finally:
        server.stop()
