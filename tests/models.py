"""Small models built at test time, written into version folders. Nothing is downloaded."""

from __future__ import annotations

import textwrap
from functools import cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


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


def write_onnx_affine(version_dir: Path, scale: float, offset: float = 0.0, width: int = 4) -> None:
    """``y = x * scale + offset`` on FP32 [-1, width]: a model whose version shows in its output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["y"]),
    ]
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
    ]
    _save(version_dir, helper.make_graph(nodes, "affine", [x], [y], inits))


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
