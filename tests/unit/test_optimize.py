"""Which variants ``inferd optimize`` attempts, from its options and the model's runtime."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument
from inferd.optimize import EXACT_TOLERANCE, INT8_TOLERANCE, OptimizeOptions, chosen, run
from inferd.optimize.calibration import Calibration
from inferd.optimize.check import check_variant, default_signature
from inferd.optimize.convert import Source, Unsupported
from inferd.optimize.onnx_variants import EXTERNAL_DATA
from inferd.runtimes import load_model
from tests.models import write_onnx_affine, write_onnx_table

MODEL, OUT = Path("models/digits"), Path("variants")


def test_by_default_every_onnx_variant_but_the_calibrated_one() -> None:
    assert chosen(OptimizeOptions(MODEL, OUT), "sklearn") == [
        "onnx",
        "onnx-optimized",
        "onnx-int8-dynamic",
        "onnx-fp16",
        "onnx-mapped",
    ]


def test_calibration_and_tflite_add_their_variants() -> None:
    options = OptimizeOptions(MODEL, OUT, calibration="rows.npy", tflite=True)
    assert chosen(options, "tensorflow") == [
        "onnx",
        "onnx-optimized",
        "onnx-int8-dynamic",
        "onnx-fp16",
        "onnx-mapped",
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


def _source(version_dir: Path) -> Source:
    model, runtime = load_model(version_dir, ModelSettings(), None)
    return Source(version_dir, runtime, ModelSettings(), model, default_signature(model))


@pytest.mark.parametrize(
    ("offset", "tolerance", "reason"),
    [
        (math.nan, INT8_TOLERANCE, "is NaN or infinite in 8 of 8 values where the original's is finite"),
        (math.inf, INT8_TOLERANCE, "is NaN or infinite in 8 of 8 values"),
        (1e36, INT8_TOLERANCE, "differs from the original's by up to 1e+36 (max_abs_diff), beyond"),
        (3.0, EXACT_TOLERANCE, "differs from the original's by up to 1 (max_abs_diff), beyond"),
    ],
)
def test_a_variant_whose_outputs_are_not_finite_or_far_off_fails_its_check(
    tmp_path: Path, offset: float, tolerance: float, reason: str
) -> None:
    """On the check's rows of zeros, ``y = 2x + offset`` answers ``offset``; the original's is 2."""
    write_onnx_affine(tmp_path / "original", scale=2.0, offset=2.0)
    write_onnx_affine(tmp_path / "variant", scale=2.0, offset=offset)
    source = _source(tmp_path / "original")
    with pytest.raises(Unsupported, match=re.escape(reason)):
        check_variant(source, tmp_path / "variant", Calibration(None), tolerance)


@pytest.mark.parametrize(("offset", "tolerance"), [(2.001, EXACT_TOLERANCE), (3.0, INT8_TOLERANCE)])
def test_a_variant_within_its_tolerance_passes_with_its_difference(
    tmp_path: Path, offset: float, tolerance: float
) -> None:
    write_onnx_affine(tmp_path / "original", scale=2.0, offset=2.0)
    write_onnx_affine(tmp_path / "variant", scale=2.0, offset=offset)
    check = check_variant(_source(tmp_path / "original"), tmp_path / "variant", Calibration(None), tolerance)
    assert check["outputs"]["y"]["max_abs_diff"] == pytest.approx(offset - 2.0, rel=1e-3)


def test_the_mapped_variant_keeps_its_weights_apart_and_is_served_from_their_mapping(tmp_path: Path) -> None:
    table = write_onnx_table(tmp_path / "models" / "table" / "1", mib=2, seed=3)
    options = OptimizeOptions(tmp_path / "models" / "table", tmp_path / "out", only=("onnx-mapped",))
    (made,) = run(options)
    assert made.ok, made.error
    weights = made.path / EXTERNAL_DATA
    assert weights.stat().st_size >= table.nbytes > 100 * (made.path / "model.onnx").stat().st_size
    record = json.loads((made.path / "variant.json").read_text())
    assert record["parameters"]["external_initializers"] == 1
    settings = ModelSettings(runtime_tables={"onnx": {"share_weights": True}})
    model, _ = load_model(made.path, settings, None)
    try:
        rows = model.predict(default_signature(model).name, {"i": np.array([5, 0], np.int64)})
        np.testing.assert_array_equal(rows["y"], table[[5, 0]])
        assert str(weights.resolve()) in Path("/proc/self/maps").read_text()
    finally:
        model.close()


def test_a_model_without_large_weights_has_no_mapped_variant(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path / "models" / "affine" / "1", scale=2.0)
    options = OptimizeOptions(tmp_path / "models" / "affine", tmp_path / "out", only=("onnx-mapped",))
    (made,) = run(options)
    assert made.error == "no weight of 1024 bytes or more to save apart"
    assert not made.path.exists()


@pytest.mark.parametrize("where", ["file", "file/below"])
def test_an_out_that_cannot_be_a_folder_is_refused_by_name(tmp_path: Path, where: str) -> None:
    """``--out`` naming a file (or a path under one) was a FileExistsError traceback."""
    write_onnx_affine(tmp_path / "models" / "affine" / "1", scale=2.0)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / where
    with pytest.raises(InvalidArgument, match=f"--out {re.escape(str(out))}: cannot make the folder"):
        run(OptimizeOptions(tmp_path / "models" / "affine", out, only=("onnx-fp16",)))


def test_a_variant_made_again_replaces_the_old_one_only_once_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variant was made in its own folder after removing the old one, so a run stopped part
    way (Ctrl-C) lost the variant made before and left a half-made folder in its place."""
    from inferd.optimize import variants

    write_onnx_affine(tmp_path / "models" / "affine" / "1", scale=2.0)
    options = OptimizeOptions(tmp_path / "models" / "affine", tmp_path / "out", only=("onnx-fp16",))
    (made,) = run(options)
    before = (made.path / "variant.json").read_text()

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(variants, "check_variant", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(options)
    assert (made.path / "variant.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["onnx-fp16", "variants.json"]
    monkeypatch.undo()
    (again,) = run(options)
    assert again.ok, again.error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["onnx-fp16", "variants.json"]
