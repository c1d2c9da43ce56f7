"""The check every variant passes before it is kept: inferd's runtime loads its folder and runs
it, and its outputs are compared with the original's on the same rows.

The rows are the first ``CHECK_ROWS`` calibration rows when ``--calibration`` is given, else
two rows of zeros (which shows that the variant runs and takes a batch, not that it is
accurate: ``inferd select`` measures that on labelled data).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.optimize.calibration import Calibration
from inferd.optimize.convert import Source, Unsupported
from inferd.runtimes import Model, load_model
from inferd.types import DEFAULT_SIGNATURE, Signature, Tensors

CHECK_ROWS = 64


def default_signature(model: Model) -> Signature:
    signatures = model.signatures
    return signatures.get(DEFAULT_SIGNATURE) or next(iter(signatures.values()))


def check_variant(
    source: Source, folder: Path, calibration: Calibration, tolerance: float = math.inf
) -> dict[str, Any]:
    """Load and run the variant in ``folder``; returns what its outputs differ from the
    original's: ``max_abs_diff`` for float outputs, ``agreement`` (share of equal values) for
    others, per output name the two have in common.

    A float output passes when it is finite wherever the original's is, and its largest
    difference is at most ``tolerance`` times the original's largest magnitude (at least 1):
    a relative bound, so that probabilities and raw scores are held alike.

    Raises:
        ModelLoadError: inferd cannot load the variant.
        InferdError or a framework error: the variant does not run on the rows.
        Unsupported: an output of another shape, not finite, or beyond the tolerance (named,
            with the difference).
    """
    variant, _ = load_model(folder, ModelSettings(), None)
    try:
        signature = default_signature(variant)
        if calibration.given:
            rows = {k: v[:CHECK_ROWS] for k, v in calibration.rows(signature).items()}
            kind = "calibration"
        else:
            rows = {
                spec.name: np.zeros(_two_rows(spec.shape, spec.name), spec.dtype) for spec in signature.inputs
            }
            kind = "zeros"
        got = variant.predict(signature.name, rows)
    finally:
        variant.close()
    expected = _original_outputs(source, rows)
    compared: dict[str, dict[str, float]] = {}
    for name in sorted(set(got) & set(expected)):
        ours, theirs = np.asarray(got[name]), np.asarray(expected[name])
        if ours.shape != theirs.shape:
            raise Unsupported(
                f"output {name!r} has shape {list(ours.shape)}; the original's is {list(theirs.shape)}"
            )
        if ours.dtype.kind == "f" and theirs.dtype.kind == "f":
            compared[name] = {"max_abs_diff": _max_abs_diff(name, ours, theirs, tolerance)}
        else:
            compared[name] = {"agreement": float(np.mean(ours == theirs)) if ours.size else 1.0}
    return {"inputs": kind, "rows": len(next(iter(rows.values()))), "outputs": compared}


def _max_abs_diff(name: str, ours: np.ndarray, theirs: np.ndarray, tolerance: float) -> float:
    """The largest difference where the original's output is finite.

    Raises:
        Unsupported: the variant's output is NaN or infinite where the original's is not, or
            the difference is beyond ``tolerance`` (relative to the original's magnitude).
    """
    finite = np.isfinite(theirs)
    ours64, theirs64 = ours.astype(np.float64)[finite], theirs.astype(np.float64)[finite]
    broken = int(np.count_nonzero(~np.isfinite(ours64)))
    if broken:
        raise Unsupported(
            f"output {name!r} is NaN or infinite in {broken} of {ours64.size} values where the "
            "original's is finite: the variant does not compute the model"
        )
    diff = float(np.abs(ours64 - theirs64).max()) if ours64.size else 0.0
    scale = max(1.0, float(np.abs(theirs64).max()) if theirs64.size else 0.0)
    if not diff <= tolerance * scale:
        raise Unsupported(
            f"output {name!r} differs from the original's by up to {diff:.6g} (max_abs_diff), beyond "
            f"this variant's tolerance of {tolerance:g} x {scale:.6g}: the variant does not compute the model"
        )
    return diff


def _two_rows(shape: tuple[int, ...] | None, name: str) -> tuple[int, ...]:
    if shape is None:
        raise Unsupported(f"input {name!r} has no known rank: give --calibration rows to check the variant")
    return (2, *(1 if d < 0 else d for d in shape[1:]))


def _original_outputs(source: Source, rows: Tensors) -> Tensors:
    """Every output of the original's signatures that take exactly these inputs (a scikit-learn
    classifier gives ``predictions`` from one signature and ``probabilities`` from another)."""
    outputs: Tensors = {}
    for signature in source.model.signatures.values():
        if set(signature.input_names()) != set(rows):
            continue
        typed = {spec.name: rows[spec.name].astype(spec.dtype) for spec in signature.inputs}
        for name, value in source.model.predict(signature.name, typed).items():
            outputs.setdefault(name, value)
    return outputs
