"""TFLite variants of Keras and TensorFlow models, made with ``tf.lite.TFLiteConverter``.

``float`` keeps float32 weights; ``dynamic`` stores weights as int8 and computes in float
(dynamic-range quantisation); ``int8`` quantises weights and activations with ranges measured on
calibration rows (full-integer kernels, ``TFLITE_BUILTINS_INT8``). All three keep float32 inputs
and outputs, so the variant takes the same requests as the original.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from inferd.optimize.convert import Source, Unsupported
from inferd.runtimes import find_model_file
from inferd.types import Tensors


def to_tflite(source: Source, target: Path, mode: str, rows: Tensors | None = None) -> dict[str, Any]:
    """Convert ``source`` to ``target`` (a ``.tflite`` file) in ``mode`` ``float``, ``dynamic`` or
    ``int8`` (which needs ``rows``).

    Raises:
        Unsupported: the model is not a Keras or TensorFlow model.
    """
    if source.runtime != "tensorflow":
        raise Unsupported(
            f"TFLite conversion needs a Keras or TensorFlow model; this is a {source.runtime} model"
        )
    import tensorflow as tf

    if source.tensorflow_kind() == "savedmodel":
        converter = tf.lite.TFLiteConverter.from_saved_model(
            str(source.path), signature_keys=[source.signature.name]
        )
        origin = "TFLiteConverter.from_saved_model"
    else:
        import keras

        path = find_model_file(source.path, ("*.keras",), source.settings.options("tensorflow").get("file"))
        converter = tf.lite.TFLiteConverter.from_keras_model(
            keras.saving.load_model(str(path), compile=False)
        )
        origin = "TFLiteConverter.from_keras_model"
    parameters: dict[str, Any] = {"tool": origin, "io": "float32"}
    if mode != "float":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        parameters["optimizations"] = "DEFAULT"
    if mode == "dynamic":
        parameters["quantization"] = "dynamic range: int8 weights, float computation"
    if mode == "int8":
        assert rows is not None
        names = source.signature.input_names()

        def representative() -> Iterator[list[Any]]:
            count = len(rows[names[0]])
            for i in range(count):
                yield [rows[name][i : i + 1] for name in names]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        parameters["quantization"] = "full integer: int8 weights and activations"
        parameters["supported_ops"] = "TFLITE_BUILTINS_INT8"
        parameters["calibration_rows"] = len(rows[names[0]])
    target.write_bytes(converter.convert())
    return parameters
