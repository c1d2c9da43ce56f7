from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inferd.capture import _keep_under, _rows, _Sample
from inferd.config import CaptureSettings, capture_from_toml
from inferd.errors import ConfigError


def test_the_oldest_capture_files_go_first_when_over_budget(tmp_path: Path) -> None:
    for name in ("capture-1.parquet", "capture-2.parquet", "capture-3.parquet"):
        (tmp_path / name).write_bytes(b"x" * 100)
    (tmp_path / "notes.txt").write_bytes(b"x" * 1000)
    _keep_under(tmp_path, 250)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "capture-2.parquet",
        "capture-3.parquet",
        "notes.txt",
    ]


def test_capture_tables_are_checked_and_paths_resolved_under_the_base(tmp_path: Path) -> None:
    settings = capture_from_toml({"path": "cap", "fraction": 0.5, "fields": ["x"]}, tmp_path, "[capture]")
    assert (settings.path, settings.fraction, settings.fields) == (tmp_path / "cap", 0.5, ("x",))
    for table, message in [
        ({}, "'path' must be a folder path"),
        ({"path": "c", "fraction": 2}, r"'fraction' must be a number in \[0, 1\]"),
        ({"path": "c", "fields": "x"}, "'fields' must be a list of column names"),
        ({"path": "c", "file_rows": 0}, "'file_rows' must be an integer >= 1"),
        ({"path": "c", "budget_mb": -1}, "'budget_mb' must be a finite number >= 0"),
        # NaN captured every request, deleted every file written; inf killed the writer thread.
        ({"path": "c", "fraction": float("nan")}, "'fraction' must be a finite number >= 0, got nan"),
        ({"path": "c", "budget_mb": float("nan")}, "'budget_mb' must be a finite number >= 0, got nan"),
        ({"path": "c", "flush_s": float("nan")}, "'flush_s' must be a finite number >= 0, got nan"),
        ({"path": "c", "flush_s": float("inf")}, "'flush_s' must be a finite number >= 0, got inf"),
        ({"path": "c", "size": 1}, r"unknown key\(s\) \['size'\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            capture_from_toml(table, tmp_path, "[capture]")


def test_fields_that_name_no_column_fail_the_sample_rather_than_keeping_it_for_ever(tmp_path: Path) -> None:
    # It gave an empty row set: counted written, never written, kept in memory until shutdown.
    settings = CaptureSettings(tmp_path, 1.0, ("nope",), 1.0, 1, 0.1, 8)
    x = np.ones((2, 4), dtype=np.float32)
    sample = _Sample(settings, "m", 1, "id", 0.0, 0.001, {"x": x}, {"y": x})
    with pytest.raises(ValueError, match=r"'fields' \['nope'\] names none of its columns"):
        _rows(sample)
    kept = _rows(
        _Sample(CaptureSettings(tmp_path, 1.0, ("x",), 1.0, 1, 0.1, 8), "m", 1, "id", 0.0, 0.0, {"x": x}, {})
    )
    assert list(kept) == ["x"]
