"""Conversion of a served model to ONNX, one converter per framework.

Each converter keeps the original's tensor names, so that a request written for the original
(``{"inputs": ...}``, ``{"images": ...}``) also fits the ONNX variant, and gives every input and
output a free batch dimension. Converters import their framework inside the function.

| source | converter |
| --- | --- |
| scikit-learn (``*.skops``, ``*.joblib``, ``*.pkl``) | skl2onnx, classifiers without ZipMap |
| Keras (``*.keras``) and SavedModels (``saved_model.pb``) | tf2onnx ``from_function`` |
| ``torch.export`` programs (``*.pt2``) | ``torch.onnx.export(dynamo=True)`` |
| TorchScript (``*.pt``, ``*.pth``) | ``torch.onnx.export(dynamo=False)``, ``dynamic_axes`` on dim 0 |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.runtimes import Model, find_model_file
from inferd.types import Signature, TensorSpec

OPSET = 17
"""ONNX opset for skl2onnx, tf2onnx and the TorchScript exporter (onnxruntime 1.18 and later
run it); the dynamo exporter picks its own (18 and up)."""


class Unsupported(Exception):
    """This variant cannot be made from this model; the message says why."""


@dataclass(frozen=True, slots=True)
class Source:
    """The model ``inferd optimize`` starts from: its version folder, the runtime that serves it,
    its ``inferd.toml`` settings, the loaded model, and its default signature."""

    path: Path
    runtime: str
    settings: ModelSettings
    model: Model
    signature: Signature

    def tensorflow_kind(self) -> str:
        """``savedmodel`` or ``keras``, as the tensorflow runtime chooses between them."""
        if (self.path / "saved_model.pb").is_file() and "file" not in self.settings.options("tensorflow"):
            return "savedmodel"
        return "keras"


def to_onnx(source: Source, target: Path) -> dict[str, Any]:
    """Convert ``source`` to ONNX at ``target``; returns the parameters to record.

    Raises:
        Unsupported: no converter for this runtime, or the model lacks what conversion needs.
    """
    if source.runtime == "sklearn":
        return _from_sklearn(source, target)
    if source.runtime == "tensorflow":
        return _from_tensorflow(source, target)
    if source.runtime == "torch":
        return _from_torch(source, target)
    raise Unsupported(
        f"no ONNX converter for {source.runtime} models here (scikit-learn, Keras/TensorFlow and "
        "PyTorch models convert)"
    )


def _from_sklearn(source: Source, target: Path) -> dict[str, Any]:
    from skl2onnx import to_onnx as skl_to_onnx
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType, StringTensorType

    estimator = getattr(source.model, "estimator", None)
    (spec,) = source.signature.inputs
    if spec.shape is None or len(spec.shape) != 2 or spec.shape[1] < 0:
        raise Unsupported(
            f"skl2onnx needs a numeric input of shape [-1, k]; this model takes {spec.describe()}"
        )
    inputs = [(spec.name, FloatTensorType([None, spec.shape[1]]))]
    outputs = None
    classes = getattr(estimator, "classes_", None)
    if classes is not None and hasattr(estimator, "predict_proba"):
        label = (
            StringTensorType([None]) if np.asarray(classes).dtype.kind in "OUS" else Int64TensorType([None])
        )
        outputs = [("predictions", label), ("probabilities", FloatTensorType([None, len(classes)]))]
    graph = skl_to_onnx(
        estimator,
        initial_types=inputs,
        final_types=outputs,
        options={"zipmap": False} if outputs else None,
        target_opset=OPSET,
    )
    target.write_bytes(graph.SerializeToString())
    return {"converter": "skl2onnx", "opset": OPSET, "input_dtype": "float32", "zipmap": False}


def _from_tensorflow(source: Source, target: Path) -> dict[str, Any]:
    import tensorflow as tf
    import tf2onnx

    if source.tensorflow_kind() == "savedmodel":
        loaded = tf.saved_model.load(str(source.path))
        function = loaded.signatures[source.signature.name]
        keep_alive: Any = loaded
    else:
        import keras

        path = find_model_file(source.path, ("*.keras",), source.settings.options("tensorflow").get("file"))
        model = keras.saving.load_model(str(path), compile=False)
        keep_alive = model
        outputs = [spec.name for spec in source.signature.outputs]

        def function(**tensors: Any) -> dict[str, Any]:
            args = [tensors[name] for name in source.signature.input_names()]
            result = model(args[0] if len(args) == 1 else args, training=False)
            values = result if isinstance(result, list | tuple) else [result]
            return dict(zip(outputs, values, strict=True))

    specs = [_tf_spec(tf, spec) for spec in source.signature.inputs]
    names = source.signature.input_names()

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]
    def call(*tensors: Any) -> Any:
        return function(**dict(zip(names, tensors, strict=True)))

    tf2onnx.convert.from_function(call, input_signature=specs, opset=OPSET, output_path=str(target))
    del keep_alive
    return {"converter": "tf2onnx.convert.from_function", "opset": OPSET, "signature": source.signature.name}


def _tf_spec(tf: Any, spec: TensorSpec) -> Any:
    if spec.shape is None or spec.dtype.kind == "O":
        raise Unsupported(
            f"tf2onnx needs numeric inputs of known rank; input {spec.name!r} is {spec.describe()}"
        )
    return tf.TensorSpec([None, *(None if d < 0 else d for d in spec.shape[1:])], spec.dtype, name=spec.name)


def _from_torch(source: Source, target: Path) -> dict[str, Any]:
    import torch

    path = find_model_file(
        source.path, ("*.pt2", "*.pt", "*.pth"), source.settings.options("torch").get("file")
    )
    inputs = source.signature.input_names()
    outputs = [spec.name for spec in source.signature.outputs]
    examples = tuple(torch.from_numpy(_example(spec)) for spec in source.signature.inputs)
    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        exported = torch.onnx.export(
            program, examples, dynamo=True, input_names=inputs, output_names=outputs, verbose=False
        )
        exported.save(str(target))
        return {"converter": "torch.onnx.export", "dynamo": True}
    module = torch.jit.load(str(path), map_location="cpu")
    batch = {name: {0: "batch"} for name in [*inputs, *outputs]}
    torch.onnx.export(
        module,
        examples,
        str(target),
        dynamo=False,
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=batch,
        opset_version=OPSET,
    )
    return {"converter": "torch.onnx.export", "dynamo": False, "opset": OPSET}


def _example(spec: TensorSpec) -> np.ndarray:
    """An input of batch 2 to trace or export with; needs every other dimension known."""
    if spec.shape is None or any(d < 0 for d in spec.shape[1:]):
        raise Unsupported(
            f"exporting needs the shape of input {spec.name!r} beyond the batch, got {spec.describe()}; "
            "declare it in [signature] in inferd.toml"
        )
    return np.ones((2, *spec.shape[1:]), dtype=spec.dtype)
