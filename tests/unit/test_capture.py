from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from inferd.capture import TrafficCapture, _keep_under, _rows, _Sample
from inferd.config import CaptureSettings, capture_from_toml
from inferd.errors import ConfigError
from inferd.metrics import Metrics
from inferd.types import ModelId


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


def test_samples_whose_file_cannot_be_written_are_counted_failed_not_written(tmp_path: Path) -> None:
    # They were counted written when they reached the writer, before their file failed.
    (tmp_path / "afile").write_text("")
    settings = CaptureSettings(tmp_path / "afile" / "caps", 1.0, (), 1.0, 10, 0.1, 8)
    manager = SimpleNamespace(settings=lambda model: SimpleNamespace(capture=settings))
    metrics = Metrics()
    capture = TrafficCapture(manager, metrics)  # type: ignore[arg-type]
    x = np.ones((1, 4), dtype=np.float32)
    response = SimpleNamespace(outputs={"y": x}, id="", model_id=ModelId("m", 1))
    call = SimpleNamespace(model="m", id="r", started=0.0, ended=0.001, inputs={"x": x}, response=response)

    async def offer() -> None:
        for _ in range(3):
            capture.offer(call)  # type: ignore[arg-type]

    asyncio.run(offer())
    capture.close()  # writes what is buffered
    count = metrics.registry.get_sample_value
    assert count("inferd_capture_samples_total", {"model": "m", "result": "failed"}) == 3
    assert count("inferd_capture_samples_total", {"model": "m", "result": "written"}) is None


def test_each_model_has_its_own_queue_bound(tmp_path: Path) -> None:
    """One model's samples waiting for the writer used to count against every model's ``queue``."""
    settings = {
        "a": CaptureSettings(tmp_path / "a", 1.0, (), 1.0, 10, 10.0, 2),
        "b": CaptureSettings(tmp_path / "b", 1.0, (), 1.0, 10, 10.0, 2),
    }
    manager = SimpleNamespace(settings=lambda model: SimpleNamespace(capture=settings[model]))
    metrics = Metrics()
    capture = TrafficCapture(manager, metrics)  # type: ignore[arg-type]
    x = np.ones((1, 4), dtype=np.float32)

    def call(model: str) -> SimpleNamespace:
        response = SimpleNamespace(outputs={"y": x}, id="", model_id=ModelId(model, 1))
        return SimpleNamespace(
            model=model, id="r", started=0.0, ended=0.001, inputs={"x": x}, response=response
        )

    async def offer() -> None:  # no hand-off to the writer runs in between: all of them wait
        for model in ("a", "a", "a", "b", "b"):
            capture.offer(call(model))  # type: ignore[arg-type]

    asyncio.run(offer())
    capture.close()
    count = metrics.registry.get_sample_value
    assert count("inferd_capture_samples_total", {"model": "a", "result": "dropped"}) == 1
    assert count("inferd_capture_samples_total", {"model": "b", "result": "dropped"}) is None
    assert count("inferd_capture_samples_total", {"model": "b", "result": "written"}) == 2
