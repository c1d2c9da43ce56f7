"""Build the demo model repository: a scikit-learn digits classifier, as ONNX and as skops.

    python examples/digits/build_models.py demo/models

writes ``demo/models/digits_onnx/1/model.onnx`` (input ``input`` FP32 [-1, 64], output
``probabilities`` FP32 [-1, 10]) and ``demo/models/digits_sklearn/1/model.skops``, trained on
scikit-learn's bundled 8x8 digits (``load_digits``), and prints the held-out accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import skops.io as sio
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def build(repository: Path) -> None:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=0.25, random_state=0
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    print(f"held-out accuracy: {model.score(x_test, y_test):.3f}")

    sklearn_dir = repository / "digits_sklearn" / "1"
    sklearn_dir.mkdir(parents=True, exist_ok=True)
    sio.dump(model, sklearn_dir / "model.skops")

    # One output, the class probabilities, like the TF Serving tutorial's Keras model, so that
    # np.argmax(predictions[i]) gives the digit.
    graph = to_onnx(
        model,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={"zipmap": False},
        target_opset=17,
    )
    onnx_model = onnx.utils.Extractor(graph).extract_model(["input"], ["probabilities"])
    onnx_dir = repository / "digits_onnx" / "1"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, onnx_dir / "model.onnx")
    print(f"wrote {sklearn_dir / 'model.skops'} and {onnx_dir / 'model.onnx'}")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "demo/models"))
