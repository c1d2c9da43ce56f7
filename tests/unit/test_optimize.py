"""Which variants ``inferd optimize`` attempts, from its options and the model's runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.errors import InvalidArgument
from inferd.optimize import OptimizeOptions, chosen

MODEL, OUT = Path("models/digits"), Path("variants")


def test_by_default_every_onnx_variant_but_the_calibrated_one() -> None:
    assert chosen(OptimizeOptions(MODEL, OUT), "sklearn") == [
        "onnx",
        "onnx-optimized",
        "onnx-int8-dynamic",
        "onnx-fp16",
    ]


def test_calibration_and_tflite_add_their_variants() -> None:
    options = OptimizeOptions(MODEL, OUT, calibration="rows.npy", tflite=True)
    assert chosen(options, "tensorflow") == [
        "onnx",
        "onnx-optimized",
        "onnx-int8-dynamic",
        "onnx-fp16",
        "onnx-int8-static",
        "tflite",
        "tflite-int8-dynamic",
        "tflite-int8",
    ]
    assert "tflite-int8" not in chosen(OptimizeOptions(MODEL, OUT, tflite=True), "tensorflow")


def test_an_onnx_model_is_not_converted_again() -> None:
    assert "onnx" not in chosen(OptimizeOptions(MODEL, OUT), "onnx")


def test_only_keeps_the_known_order_and_refuses_unknown_names() -> None:
    options = OptimizeOptions(MODEL, OUT, only=("tflite", "onnx-fp16"))
    assert chosen(options, "sklearn") == ["onnx-fp16", "tflite"]
    with pytest.raises(InvalidArgument, match=r"--only: unknown variant\(s\) \['onnx-int4'\]"):
        chosen(OptimizeOptions(MODEL, OUT, only=("onnx-int4",)), "sklearn")
