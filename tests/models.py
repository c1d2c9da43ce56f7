"""Small models built at test time, written into version folders. Nothing is downloaded."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y


@cache
def digits_classifier() -> object:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = digits()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x[:1200], y[:1200])


def write_sklearn_digits(version_dir: Path) -> object:
    """A skops-saved digits classifier; returns the estimator for in-process comparison."""
    import skops.io as sio

    version_dir.mkdir(parents=True, exist_ok=True)
    model = digits_classifier()
    sio.dump(model, version_dir / "model.skops")
    return model


def write_sklearn_regressor(version_dir: Path) -> object:
    import skops.io as sio
    from sklearn.linear_model import Ridge

    x, y = digits()
    model = Ridge().fit(x, y.astype(np.float64))
    version_dir.mkdir(parents=True, exist_ok=True)
    sio.dump(model, version_dir / "model.skops")
    return model


def write_onnx_digits(version_dir: Path) -> None:
    """The digits classifier as ONNX: input ``X`` FP32 [-1, 64] -> ``label``, ``probabilities``."""
    from skl2onnx import to_onnx

    version_dir.mkdir(parents=True, exist_ok=True)
    x, _ = digits()
    graph = to_onnx(digits_classifier(), x[:1], options={"zipmap": False}, target_opset=17)
    onnx.save(graph, version_dir / "model.onnx")


def write_onnx_affine(
    version_dir: Path, scale: float, offset: float = 0.0, width: int = 4, output: str = "y"
) -> None:
    """``output = x * scale + offset`` on FP32 [-1, width]: a model whose version shows in its
    output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", width])
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], [output]),
    ]
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
    ]
    _save(version_dir, helper.make_graph(nodes, "affine", [x], [y], inits))


def write_onnx_table(version_dir: Path, mib: float, seed: int) -> np.ndarray:
    """``y = table[i]``: INT64 [-1] row numbers -> FP32 [-1, 16] rows of a random table of about
    ``mib`` MiB (an initializer onnxruntime keeps: it cannot fold it away). Returns the table."""
    rows = max(int(mib * 2**20) // 64, 1)
    table = np.random.default_rng(seed).standard_normal((rows, 16), dtype=np.float32)
    i = helper.make_tensor_value_info("i", TensorProto.INT64, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])
    node = helper.make_node("Gather", ["table", "i"], ["y"], axis=0)
    init = numpy_helper.from_array(table, "table")
    _save(version_dir, helper.make_graph([node], "table", [i], [y], [init]))
    return table


def write_onnx_affine_external(version_dir: Path, scale: float, width: int = 4) -> None:
    """``write_onnx_affine`` saved as two files, ``model.onnx`` and its weights in
    ``weights.bin`` (ONNX external data): a version that is incomplete until both are there."""
    write_onnx_affine(version_dir, scale, width=width)
    model = onnx.load(version_dir / "model.onnx")
    for tensor in model.graph.initializer:  # only raw_data moves to the external file
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    onnx.save(
        model,
        version_dir / "model.onnx",
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )


def write_onnx_two_inputs(version_dir: Path) -> None:
    """Inputs ``a`` FP32 [-1, 3] and ``b`` INT64 [-1, 1]; outputs ``sum`` FP32 [-1, 3] (a + b)
    and ``count`` INT64 [-1] (3 per row)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 1])
    total = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3])
    count = helper.make_tensor_value_info("count", TensorProto.INT64, ["batch"])
    nodes = [
        helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b_float"], ["sum"]),
        helper.make_node("Shape", ["a"], ["shape"]),
        helper.make_node("Slice", ["shape", "one", "two"], ["width"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["rows"]),
        helper.make_node("Expand", ["width", "rows"], ["count"]),
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
    ]
    _save(version_dir, helper.make_graph(nodes, "two_inputs", [a, b], [total, count], inits))


def _save(version_dir: Path, graph: onnx.GraphProto) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, version_dir / "model.onnx")


def write_python_model(version_dir: Path, body: str, signature: str | None = None) -> None:
    """A custom ``model.py``; ``body`` is the class body after its signature attribute."""
    version_dir.mkdir(parents=True, exist_ok=True)
    sig = signature or (
        '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}], '
        '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]}'
    )
    lines = ["import numpy as np", "", "", "class Model:", f"    signature = {sig}", ""]
    lines += ["    " + line for line in textwrap.dedent(body).strip("\n").splitlines()]
    (version_dir / "model.py").write_text("\n".join(lines) + "\n")


# --- frameworks: each writer returns an in-process predictor to compare the server with ---------

Predictor = Callable[[np.ndarray], np.ndarray]


def write_xgboost(version_dir: Path, objective: str) -> Predictor:
    """An XGBoost booster on the digits (``multi:softprob`` or ``reg:squarederror``) as
    ``model.ubj``; returns the booster's own ``inplace_predict``."""
    import xgboost as xgb

    x, y = digits()
    params = {"objective": objective, "max_depth": 3, "nthread": 1}
    if objective.startswith("multi:"):
        params["num_class"] = 10
    booster = xgb.train(params, xgb.DMatrix(x[:600], label=y[:600]), num_boost_round=5)
    version_dir.mkdir(parents=True, exist_ok=True)
    booster.save_model(version_dir / "model.ubj")
    return lambda rows: np.asarray(booster.inplace_predict(rows))


def write_lightgbm(version_dir: Path, objective: str) -> Predictor:
    """A LightGBM booster on the digits (``binary`` on "is it a 0", or ``regression``) as
    ``model.txt``; returns the booster's own ``predict``."""
    import lightgbm as lgb

    x, y = digits()
    label = (y == 0).astype(np.float64) if objective == "binary" else y.astype(np.float64)
    params = {"objective": objective, "num_leaves": 7, "num_threads": 1, "verbose": -1}
    booster = lgb.train(params, lgb.Dataset(x[:600], label=label[:600]), num_boost_round=5)
    version_dir.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(version_dir / "model.txt"))
    return lambda rows: np.asarray(booster.predict(rows))


def _torch_module() -> object:
    import torch

    class Scorer(torch.nn.Module):
        """Two inputs, two outputs: ``softmax(linear(x)) * weight`` and the row sums of ``x``."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.softmax(self.linear(x), dim=1) * weight, x.sum(dim=1)

    return Scorer().eval()


def write_torchscript(version_dir: Path) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
    """The scorer, traced to TorchScript as ``model.pt``: inputs ``x`` FP32 [-1, 64] and
    ``weight`` FP32 [-1, 1], outputs ``output_0`` [-1, 10] and ``output_1`` [-1]."""
    import torch

    module = _torch_module()
    example = (torch.zeros(2, 64), torch.ones(2, 1))
    traced = torch.jit.trace(module, example)
    version_dir.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(version_dir / "model.pt"))
    return _torch_predictor(traced)


def write_torch_export(version_dir: Path) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
    """The scorer as a ``torch.export`` program with a dynamic batch, saved as ``model.pt2``."""
    import torch

    module = _torch_module()
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        module,  # type: ignore[arg-type]
        (torch.zeros(2, 64), torch.ones(2, 1)),
        dynamic_shapes={"x": {0: batch}, "weight": {0: batch}},
    )
    version_dir.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(version_dir / "model.pt2"))
    return _torch_predictor(program.module())


def _torch_predictor(module: Any) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
    import torch

    def run(x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            out = module(torch.from_numpy(x), torch.from_numpy(weight))
        return tuple(t.numpy() for t in out)

    return run


def _tf_module() -> Any:
    """A ``tf.Module`` with two signatures: ``serving_default`` takes ``text`` (strings) and
    ``x`` FP32 [-1, 3] and returns ``length`` INT32, ``upper`` strings and ``scaled`` FP32;
    ``double`` takes ``x`` and returns ``y = 2x``."""
    import tensorflow as tf

    class Texts(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = tf.Variable([1.0, 2.0, 3.0])

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.string, name="text"),
                tf.TensorSpec([None, 3], tf.float32, name="x"),
            ]
        )
        def serve(self, text: Any, x: Any) -> dict[str, Any]:
            return {
                "length": tf.strings.length(text),
                "upper": tf.strings.upper(text),
                "scaled": x * self.scale,
            }

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def double(self, x: Any) -> dict[str, Any]:
            return {"y": x * 2.0}

    return Texts()


def write_tf_saved_model(version_dir: Path) -> Any:
    """The two-signature module as a SavedModel; returns its loaded signatures."""
    import tensorflow as tf

    module = _tf_module()
    tf.saved_model.save(
        module, str(version_dir), signatures={"serving_default": module.serve, "double": module.double}
    )
    return tf.saved_model.load(str(version_dir)).signatures


def keras_digits_model() -> Any:
    """The TF Serving tutorial's model shape on 8x8 digits: Flatten then Dense(10, softmax)."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8), name="images"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax", name="Softmax"),
        ]
    )


def write_keras(version_dir: Path) -> Any:
    """An untrained tutorial model as ``model.keras``; returns the model."""
    model = keras_digits_model()
    version_dir.mkdir(parents=True, exist_ok=True)
    model.save(version_dir / "model.keras")
    return model


def write_tflite(version_dir: Path) -> Any:
    """The tutorial model converted to TFLite (``model.tflite``, dynamic batch); returns the Keras
    model it came from."""
    import tensorflow as tf

    model = keras_digits_model()
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return model


def features_toml(store: str, **extra: str) -> str:
    """An ``inferd.toml`` that looks up ``incoming_orders`` and ``outstanding_per_min`` by
    ``restaurant_id`` in ``store`` and joins them after ``distance_km`` into input ``x``. The
    lookup timeout is 2 s unless ``extra`` sets it: the 50 ms default fails lookups on a CI machine
    under load, in tests that are not about timeouts."""
    extra = {"lookup_timeout_ms": "2000", **extra}
    lines = [
        "[features]",
        f'store = "{store}"',
        'entity = "restaurant_id"',
        'prefix = "restaurant"',
        'fetch = ["incoming_orders", "outstanding_per_min"]',
        *(f"{key} = {value}" for key, value in extra.items()),
        "[features.inputs]",
        'x = ["distance_km", "incoming_orders", "outstanding_per_min"]',
    ]
    return "\n".join(lines) + "\n"


def write_tf1_half_plus_two(version_dir: Path) -> None:
    """A TF1-style SavedModel (``SavedModelBuilder``, a graph and a session) computing
    ``y = 0.5 * x + 2``: ``serving_default`` (predict, ``x`` declared [-1, 1]),
    ``classify_x_to_y`` (classify: serialized ``tf.Example``s with feature ``x`` -> ``scores``)
    and ``regress_x_to_y`` (regress: the same -> ``outputs``), with TF1's method names."""
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 1], name="x")
        a = v1.Variable(0.5, name="a")
        b = v1.Variable(2.0, name="b")
        y = tf.add(tf.multiply(a, x), b, name="y")
        serialized = v1.placeholder(tf.string, name="tf_example")
        parsed = v1.parse_example(serialized, {"x": v1.FixedLenFeature([1], tf.float32)})
        y_of_example = tf.add(tf.multiply(a, parsed["x"]), b, name="y_of_example")
        info = v1.saved_model.utils.build_tensor_info
        build = v1.saved_model.signature_def_utils.build_signature_def
        signatures = {
            "serving_default": build({"x": info(x)}, {"y": info(y)}, "tensorflow/serving/predict"),
            "classify_x_to_y": build(
                {"inputs": info(serialized)}, {"scores": info(y_of_example)}, "tensorflow/serving/classify"
            ),
            "regress_x_to_y": build(
                {"inputs": info(serialized)}, {"outputs": info(y_of_example)}, "tensorflow/serving/regress"
            ),
        }
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(version_dir))
            builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signatures)
            builder.save()


def write_tf2_half_plus_two(version_dir: Path) -> None:
    """A TF2 SavedModel (``tf.saved_model.save``) computing ``y = 0.5 * x + 2`` with ``x``
    declared [-1, 1] (``serving_default``), ``matmul`` (``x @ [[0.5]] + 2``, which needs rank 2),
    and ``regress_x_to_y`` taking serialized ``tf.Example``s, as TF2 records it (method predict)."""
    import tensorflow as tf

    class HalfPlusTwo(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
        def predict(self, x: Any) -> dict[str, Any]:
            return {"y": 0.5 * x + 2.0}

        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
        def matmul(self, x: Any) -> dict[str, Any]:
            return {"y": tf.matmul(x, tf.constant([[0.5]])) + 2.0}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, inputs: Any) -> dict[str, Any]:
            x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]
            return {"outputs": 0.5 * x + 2.0}

    module = HalfPlusTwo()
    signatures = {
        "serving_default": module.predict,
        "matmul": module.matmul,
        "regress_x_to_y": module.regress,
    }
    tf.saved_model.save(module, str(version_dir), signatures=signatures)


def write_tflite_without_signatures(version_dir: Path) -> None:
    """``model.tflite`` converted from a TF1 session (``y = 0.5 * x + 2``, tensors ``x`` and ``y``):
    such converters record no signature."""
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 1], name="x")
        y = tf.add(tf.multiply(x, 0.5), 2.0, name="y")
        with v1.Session(graph=graph) as session:
            data = v1.lite.TFLiteConverter.from_session(session, [x], [y]).convert()
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.tflite").write_bytes(data)


def write_onnx_matmul_external(version_dir: Path, width: int, seed: int = 0) -> np.ndarray:
    """``y = x @ w`` on FP32 [-1, width] with a random [width, width] ``w`` saved as ONNX external
    data in ``weights.bin`` (onnx aligns it to pages); returns ``w``."""
    w = np.random.default_rng(seed).standard_normal((width, width), dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul", [x], [y], [numpy_helper.from_array(w, "w")]
    )
    _save(version_dir, graph)
    model = onnx.load(version_dir / "model.onnx")
    onnx.save(
        model,
        version_dir / "model.onnx",
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    return w
