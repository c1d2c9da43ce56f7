"""The benchmark's models, built at bench time (never downloaded), and their request inputs.

- ``digits``: scikit-learn ``MLPClassifier`` on ``load_digits`` (64 float32 features), converted
  with skl2onnx (``zipmap=False``), cut down to its ``probabilities`` output.
- ``cnn``: a small CNN built with ``onnx.helper``: input float32 [N, 1, 28, 28], conv 3x3 (8) + relu
  + maxpool 2, conv 3x3 (16) + relu + maxpool 2, linear 784 -> 10, softmax; weights drawn from a
  fixed seed, so the file is the same at every run.

Both have input ``input`` and output ``probabilities`` and a free batch dimension.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.models import digits

MODELS = ("digits", "cnn")
OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime the alternatives install


def build_digits(path: Path) -> None:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier

    x, y = digits()
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(x, y)
    graph = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={"zipmap": False},
        target_opset=OPSET,
    )
    model = onnx.utils.Extractor(graph).extract_model(["input"], ["probabilities"])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def build_cnn(path: Path) -> None:
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...], fan_in: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name
        )

    inits = [
        init("w1", (8, 1, 3, 3), 9),
        numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
        init("w2", (16, 8, 3, 3), 72),
        numpy_helper.from_array(np.zeros(16, np.float32), "b2"),
        init("w3", (784, 10), 784),
        numpy_helper.from_array(np.zeros(10, np.float32), "b3"),
    ]
    pool: dict[str, Any] = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], **pool),  # 8x14x14
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], **pool),  # 16x7x7
        helper.make_node("Flatten", ["p2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inferd-bench"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def model_path(repo: Path, model: str) -> Path:
    """``repo/<model>/1/model.onnx``: the layout inferd serves, and the file every other server loads."""
    return repo / model / "1" / "model.onnx"


def build_all(repo: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for name, build in (("digits", build_digits), ("cnn", build_cnn)):
        path = model_path(repo, name)
        if not path.exists():
            build(path)
        paths[name] = path
    return paths


def repository_of(repo: Path, model: str, built: Path) -> Path:
    """A repository at ``repo`` serving only ``model``, copied from ``build_all(built)``; returns
    the built model file."""
    model_file = build_all(built)[model]
    target = model_path(repo, model)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(model_file.read_bytes())
    return model_file


def instances(model: str, n: int) -> np.ndarray:
    """``n`` request examples: real digits rows, or fixed pseudo-random images (3 decimals)."""
    if model == "digits":
        x = digits()[0]
        return x[np.arange(n) % len(x)]
    rng = np.random.default_rng(1)
    return np.round(rng.random((n, 1, 28, 28), dtype=np.float32), 3)
