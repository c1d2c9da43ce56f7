from __future__ import annotations

import numpy as np
import pytest

from inferd.config import ShadowSettings, shadow_from_toml
from inferd.errors import ConfigError
from inferd.shadow import compare


def test_auto_compares_scores_by_argmax_regressions_within_tolerance_and_labels_exactly() -> None:
    scores = np.array([[0.1, 0.9], [0.6, 0.4]], dtype=np.float32)
    shifted = np.array([[0.2, 0.8], [0.4, 0.6]], dtype=np.float32)
    agreeing, rows, differences = compare({"p": scores}, {"p": shifted}, "auto", 1e-6)
    assert (agreeing, rows) == (1, 2)
    assert differences == pytest.approx([0.1, 0.2])
    regression = np.array([1.0, 2.0, 3.0])
    assert compare({"y": regression}, {"y": regression + np.array([0, 1e-7, 1e-3])}, "auto", 1e-6)[:2] == (
        2,
        3,
    )
    labels = np.array([1, 2, 3])
    assert compare({"label": labels}, {"label": np.array([1, 0, 3])}, "auto", 0.0)[:2] == (2, 3)


def test_a_missing_output_or_another_shape_disagrees_on_every_row() -> None:
    x = np.zeros((3, 2), dtype=np.float32)
    assert compare({"y": x}, {}, "auto", 1.0)[:2] == (0, 3)
    assert compare({"y": x}, {"y": np.zeros((3, 3))}, "auto", 1.0)[:2] == (0, 3)


def test_an_empty_batch_compares_no_rows() -> None:
    # It raised: the request counted as a shadow failure, and with every other request batched
    # with it for a [batching] shadow.
    empty = {"scores": np.zeros((0, 3), np.float32), "value": np.zeros((0, 1), np.float32)}
    for how in ("auto", "argmax", "tolerance", "exact"):
        assert compare(empty, dict(empty), how, 1e-6) == (0, 0, [])


def test_nan_on_both_sides_agrees_and_nan_on_one_side_shows_no_difference() -> None:
    # NaN disagreed with NaN (identical versions agreed on 1 row of 3), and a NaN difference went
    # to the histogram's smallest bucket and made its sum NaN for good.
    primary = {"y": np.array([[np.nan], [np.inf], [1.0]], np.float32)}
    for how in ("auto", "tolerance", "exact"):
        assert compare(primary, {"y": primary["y"].copy()}, how, 1e-6) == (3, 3, [0.0, 0.0, 0.0])
    shadow = {"y": np.array([[5.0], [np.inf], [1.5]], np.float32)}
    assert compare(primary, shadow, "auto", 1e-6) == (1, 3, [0.0, 0.5])


def test_shadow_tables_are_checked() -> None:
    assert shadow_from_toml({"version": 3, "fraction": 1}, "[shadow]") == ShadowSettings(3, 1.0)
    for table, message in [
        ({}, "'version' must be a version number"),
        ({"version": 2, "fraction": 1.5}, r"'fraction' must be a number in \[0, 1\]"),
        ({"version": 2, "compare": "fuzzy"}, "'compare' must be one of"),
        ({"version": 2, "queue": 0}, "'queue' must be an integer >= 1"),
        ({"version": 2, "versoin": 2}, r"unknown key\(s\) \['versoin'\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            shadow_from_toml(table, "[shadow]")
