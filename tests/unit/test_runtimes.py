import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.runtimes import detect_runtime, get_runtime, import_framework, load_model
from tests.models import (
    write_lightgbm,
    write_onnx_affine,
    write_python_model,
    write_sklearn_digits,
    write_torch_export,
    write_xgboost,
)


def test_detection_by_files(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path / "onnx", 2.0)
    write_sklearn_digits(tmp_path / "sk")
    write_python_model(
        tmp_path / "py", "def load(self):\n    pass\n\ndef predict(self, inputs):\n    return inputs\n"
    )
    assert detect_runtime(tmp_path / "onnx") == "onnx"
    assert detect_runtime(tmp_path / "sk") == "sklearn"
    assert detect_runtime(tmp_path / "py") == "python"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model file"):
        detect_runtime(tmp_path / "empty")


def test_platform_aliases_and_unknown_runtime() -> None:
    assert get_runtime("scikit-learn").name == "sklearn"
    assert get_runtime("ONNXRUNTIME").name == "onnx"
    with pytest.raises(ModelLoadError, match="unknown runtime 'tensorflow-nope'"):
        get_runtime("tensorflow-nope")


def test_onnx_signature_and_prediction(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path, 3.0, 1.0)
    model, runtime = load_model(tmp_path, ModelSettings(), None)
    signature = model.signatures["serving_default"]
    assert runtime == "onnx"
    assert [(s.name, s.dtype, s.shape) for s in signature.inputs] == [("x", np.dtype(np.float32), (-1, 4))]
    out = model.predict("serving_default", {"x": np.ones((2, 4), np.float32)})
    assert out["y"].tolist() == [[4.0] * 4] * 2


def test_an_onnx_tensor_without_a_declared_shape_has_an_unknown_rank_and_a_scalar_stays_one(
    tmp_path: Path,
) -> None:
    # onnxruntime shows both with shape []: the shapeless one was served as a scalar, so every
    # request with data in it was refused ("expected FP32 [], got FP64 [1, 2]").
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    bias = helper.make_tensor_value_info("bias", TensorProto.FLOAT, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Add", ["x", "bias"], ["y"])], "g", [x, bias], [y])
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    onnx.save(model_proto, tmp_path / "model.onnx")
    model, _ = load_model(tmp_path, ModelSettings(), None)
    signature = model.signatures["serving_default"]
    assert {s.name: s.shape for s in (*signature.inputs, *signature.outputs)} == {
        "x": None,
        "bias": (),
        "y": None,
    }
    out = model.predict(
        "serving_default", {"x": np.ones((2, 3), np.float32), "bias": np.array(1, np.float32)}
    )
    assert out["y"].tolist() == [[2.0] * 3] * 2


def test_onnx_options_are_checked(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path, 1.0)
    with pytest.raises(ModelLoadError, match="unknown \\[onnx\\] option"):
        load_model(tmp_path, ModelSettings(runtime_tables={"onnx": {"threads": 2}}), "onnx")
    with pytest.raises(ModelLoadError, match="intra_op_num_threads must be an integer"):
        load_model(tmp_path, ModelSettings(runtime_tables={"onnx": {"intra_op_num_threads": "2"}}), "onnx")


def test_corrupt_onnx_file_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"onnxruntime could not load model\.onnx"):
        load_model(tmp_path, ModelSettings(), None)


def test_sklearn_classifier_signatures_and_outputs(tmp_path: Path) -> None:
    estimator = write_sklearn_digits(tmp_path)
    model, _ = load_model(tmp_path, ModelSettings(), None)
    assert sorted(model.signatures) == ["classify", "predict_proba", "serving_default"]
    x = np.random.default_rng(0).random((3, 64))
    assert (
        model.predict("serving_default", {"inputs": x})["predictions"].tolist()
        == estimator.predict(x).tolist()
    )  # type: ignore[attr-defined]
    scores = model.predict("classify", {"inputs": x})["scores"]
    np.testing.assert_array_equal(scores, estimator.predict_proba(x))  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="scikit-learn rejected the input"):
        model.predict("serving_default", {"inputs": np.full((1, 64), np.nan)})


def test_python_model_without_signature_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(
        "class Model:\n    def load(self): pass\n    def predict(self, inputs): return inputs\n"
    )
    with pytest.raises(ModelLoadError, match="declare the signature"):
        load_model(tmp_path, ModelSettings(), None)


def test_a_python_model_loaded_again_while_its_old_copy_serves_keeps_its_own_module(tmp_path: Path) -> None:
    """A version loaded again (an admin load after an unload, a reload under a memory budget)
    while its old copy finishes its requests: each copy's classes stay importable by name (as
    pickle finds them), also once the other copy is closed."""
    write_python_model(
        tmp_path,
        """
        class Box:
            pass

        def load(self):
            pass

        def predict(self, inputs):
            import pickle

            pickle.dumps(self.Box())
            return {"y": inputs["x"]}
        """,
    )
    x = {"x": np.ones((1, 2), np.float32)}
    old, _ = load_model(tmp_path, ModelSettings(), None)
    new, _ = load_model(tmp_path, ModelSettings(), None)
    old.predict("serving_default", x)
    old.close()
    new.predict("serving_default", x)
    new.close()


def test_python_model_signature_from_settings(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(
        "class Model:\n"
        "    def load(self): pass\n"
        "    def predict(self, inputs): return {'y': inputs['x'] + 1}\n"
    )
    declared = {
        "inputs": [{"name": "x", "dtype": "int64", "shape": [-1]}],
        "outputs": [{"name": "y", "dtype": "int64", "shape": [-1]}],
    }
    model, _ = load_model(tmp_path, ModelSettings(signature=declared), None)
    assert model.predict("serving_default", {"x": np.array([1, 2])})["y"].tolist() == [2, 3]
    model.close()


def test_detection_of_framework_files(tmp_path: Path) -> None:
    cases = {
        "saved_model.pb": "tensorflow",
        "model.keras": "tensorflow",
        "model.tflite": "tflite",
        "model.pt2": "torch",
        "model.pt": "torch",
        "weights.pth": "torch",
        "model.ubj": "xgboost",
        "model.json": "xgboost",
        "model.txt": "lightgbm",
    }
    for file, runtime in cases.items():
        folder = tmp_path / file
        folder.mkdir()
        (folder / file).write_bytes(b"")
        assert detect_runtime(folder) == runtime, file
    assert get_runtime("pytorch").name == "torch"
    assert get_runtime("tensorflow_savedmodel").name == "tensorflow"
    assert get_runtime("LiteRT").name == "tflite"


def test_a_missing_framework_names_the_extra_to_install() -> None:
    with pytest.raises(ModelLoadError, match=r"needs inferd_absent_framework.*pip install 'inferd\[torch\]'"):
        import_framework("inferd_absent_framework", "torch")


def test_cpu_only_runtimes_refuse_a_gpu(tmp_path: Path) -> None:
    write_sklearn_digits(tmp_path)
    with pytest.raises(ModelLoadError, match="the sklearn runtime runs on the CPU only"):
        load_model(tmp_path, ModelSettings(device="cuda:0"), None)


def test_onnx_on_cuda_without_the_cuda_provider_is_a_load_error(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path, 1.0)
    with pytest.raises(ModelLoadError, match="device 'cuda:0' asks for CUDA, but this onnxruntime has only"):
        load_model(tmp_path, ModelSettings(device="cuda:0"), None)


def test_torch_options_and_a_framework_error_in_predict(tmp_path: Path) -> None:
    write_torch_export(tmp_path)
    with pytest.raises(ModelLoadError, match=r"unknown \[torch\] option\(s\) \['threads'\]"):
        load_model(tmp_path, ModelSettings(runtime_tables={"torch": {"threads": 2}}), None)
    with pytest.raises(ModelLoadError, match=r"\[torch\] num_threads must be an integer >= 0"):
        load_model(tmp_path, ModelSettings(runtime_tables={"torch": {"num_threads": -1}}), None)
    model, _ = load_model(tmp_path, ModelSettings(), None)
    bad = {"x": np.zeros((2, 5), np.float32), "weight": np.ones((2, 1), np.float32)}
    with pytest.raises(InvalidArgument, match="torch rejected the input"):
        model.predict("serving_default", bad)


def test_torchscript_returning_a_dict_needs_declared_outputs(tmp_path: Path) -> None:
    import torch

    class Named(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"double": x * 2, "half": x / 2}

    torch.jit.save(torch.jit.script(Named()), str(tmp_path / "model.pt"))
    with pytest.raises(ModelLoadError, match=r"declare its outputs in \[signature\]"):
        load_model(tmp_path, ModelSettings(), None)
    declared = {"outputs": [{"name": "half", "dtype": "float32", "shape": [-1]}]}
    model, _ = load_model(tmp_path, ModelSettings(signature=declared), None)
    outputs = model.predict("serving_default", {"x": np.array([4.0], np.float32)})
    assert {name: value.tolist() for name, value in outputs.items()} == {"half": [2.0]}


def test_xgboost_rejects_a_wrong_feature_count_as_the_callers_fault(tmp_path: Path) -> None:
    write_xgboost(tmp_path, "reg:squarederror")
    model, runtime = load_model(tmp_path, ModelSettings(runtime_tables={"xgboost": {"num_threads": 2}}), None)
    assert runtime == "xgboost"
    assert sorted(model.signatures) == ["regress", "serving_default"]
    with pytest.raises(InvalidArgument, match="xgboost rejected the input"):
        model.predict("regress", {"inputs": np.zeros((1, 3), np.float32)})


def test_a_truncated_lightgbm_model_is_a_load_error_not_a_crash(tmp_path: Path) -> None:
    """LightGBM aborts or crashes the process on a model file cut inside a tree or its parameters
    (a file still being copied): the load must fail with a ModelLoadError, in a child process here
    so that a crash fails the test instead of ending it."""
    write_lightgbm(tmp_path / "full", "regression")
    text = (tmp_path / "full" / "model.txt").read_text()
    for name, cut in [("tree", len(text) // 2), ("parameters", text.index("end of parameters") + 3)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.txt").write_text(text[:cut])
    script = (
        "import sys\nfrom pathlib import Path\nfrom inferd.config import ModelSettings\n"
        "from inferd.errors import ModelLoadError\nfrom inferd.runtimes import load_model\n"
        "for name in ('tree', 'parameters'):\n"
        "    try:\n        load_model(Path(sys.argv[1], name), ModelSettings(), None)\n"
        "    except ModelLoadError as exc:\n        print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == 2 * [
        "lightgbm could not load model.txt: not a complete LightGBM model file (it lacks its "
        "'end of trees' or 'end of parameters' line: cut short, or another kind of file)"
    ]
    model, _ = load_model(tmp_path / "full", ModelSettings(), None)
    assert sorted(model.signatures) == ["regress", "serving_default"]


def test_a_garbled_xgboost_model_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "model.ubj").write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(ModelLoadError, match=r"xgboost could not load model\.ubj"):
        load_model(tmp_path, ModelSettings(), None)


def test_a_keras_model_returning_a_dict_serves_its_outputs_by_key(tmp_path: Path) -> None:
    """A functional model whose outputs are a dict returns a dict when called: its outputs are
    served under their keys (every call was refused as the client's fault before)."""
    keras = pytest.importorskip("keras")
    x = keras.Input((3,), name="x")
    outputs = {"sum": keras.layers.Dense(1, name="d1")(x), "pair": keras.layers.Dense(2, name="d2")(x)}
    reference = keras.Model(x, outputs)
    reference.save(tmp_path / "model.keras")
    model, runtime = load_model(tmp_path, ModelSettings(), None)
    assert runtime == "tensorflow"
    signature = model.signatures["serving_default"]
    assert [(spec.name, spec.shape) for spec in signature.outputs] == [("pair", (-1, 2)), ("sum", (-1, 1))]
    inputs = np.arange(6, dtype=np.float32).reshape(2, 3)
    served = model.predict("serving_default", {"x": inputs})
    expected = reference(inputs)
    for name in ("pair", "sum"):
        np.testing.assert_allclose(served[name], np.asarray(expected[name]), rtol=1e-6)


def test_a_multiclass_xgboost_classifier_answers_a_request_without_rows(tmp_path: Path) -> None:
    """xgboost answers no rows with a flat array even for many classes: it is not taken for a
    binary classifier's (two columns of probabilities, a 500 from classify)."""
    write_xgboost(tmp_path, "multi:softprob")
    model, _ = load_model(tmp_path, ModelSettings(), None)
    k = model.signatures["predict_proba"].outputs[0].shape[1]  # type: ignore[index]
    assert k > 2
    empty = {"inputs": np.zeros((0, 64), np.float32)}
    assert model.predict("predict_proba", empty)["probabilities"].shape == (0, k)
    classify = model.predict("classify", empty)
    assert (classify["classes"].shape, classify["scores"].shape) == ((0, k), (0, k))
    assert model.predict("serving_default", empty)["predictions"].shape == (0,)


class _RecordingOrt:
    """Stands in for the onnxruntime module in ``_build``: records where a session was built."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.built_in: list[tuple[int, int]] = []  # (native thread id, its nice value)

    def InferenceSession(self, path: str, sess_options: object, providers: object) -> str:  # noqa: N802
        tid = threading.get_native_id()
        self.built_in.append((tid, os.getpriority(os.PRIO_PROCESS, tid)))
        if self.fail:
            raise RuntimeError(f"cannot parse {path}")
        return f"session of {path}"


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are Linux's")
def test_with_load_nice_an_onnx_session_is_built_at_lower_priority_in_a_thread_of_its_own() -> None:
    from inferd.runtimes import onnx

    me = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, me)
    ort = _RecordingOrt()
    assert onnx._build(ort, "m.onnx", None, [], nice=5) == "session of m.onnx"
    ((tid, nice),) = ort.built_in
    assert tid != me
    assert nice == min(before + 5, 19)
    assert os.getpriority(os.PRIO_PROCESS, me) == before  # the load thread keeps its priority

    plain = _RecordingOrt()
    onnx._build(plain, "m.onnx", None, [], nice=0)
    assert plain.built_in == [(me, before)]

    with pytest.raises(RuntimeError, match=r"cannot parse m\.onnx"):
        onnx._build(_RecordingOrt(fail=True), "m.onnx", None, [], nice=5)


def test_load_nice_is_checked_and_leaves_the_load_threads_priority_alone(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path, 2.0)
    me = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, me)
    model, _ = load_model(tmp_path, ModelSettings(runtime_tables={"onnx": {"load_nice": 10}}), "onnx")
    out = model.predict("serving_default", {"x": np.ones((1, 4), np.float32)})
    assert os.getpriority(os.PRIO_PROCESS, me) == before
    assert out["y"].tolist() == [[2.0] * 4]
    with pytest.raises(ModelLoadError, match="load_nice must be 0 to 19, got 20"):
        load_model(tmp_path, ModelSettings(runtime_tables={"onnx": {"load_nice": 20}}), "onnx")
    threaded = {"load_nice": 10, "intra_op_num_threads": 2}
    with pytest.raises(ModelLoadError, match="load_nice needs device = cpu and intra_op_num_threads"):
        load_model(tmp_path, ModelSettings(runtime_tables={"onnx": threaded}), "onnx")
