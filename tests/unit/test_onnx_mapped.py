"""``[onnx] share_weights`` on a model whose weights are inside ``model.onnx``: the first load
writes a copy with the weights as external data, and every load builds the session from it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from inferd.config import ModelSettings
from inferd.model_cache import DERIVED, ModelCache
from inferd.runtimes.onnx import RUNTIME, maps_weights
from inferd.runtimes.onnx_mapped import FOLDER, WEIGHTS
from tests.models import write_onnx_affine, write_onnx_table

ROWS = np.array([0, 3, 7], dtype=np.int64)


def _settings(cache: Path, share: bool = True, **onnx: object) -> ModelSettings:
    tables = {"onnx": {"share_weights": share, **onnx}}
    return ModelSettings(runtime="onnx", runtime_tables=tables, cache_dir=str(cache))


def _predict(folder: Path, settings: ModelSettings) -> np.ndarray:
    model = RUNTIME.load(folder, settings)
    try:
        return model.predict("serving_default", {"i": ROWS})["y"]
    finally:
        model.close()


def _entries(cache: Path) -> list[Path]:
    root = cache / DERIVED / FOLDER
    return (
        sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".tmp-"))
        if root.is_dir()
        else []
    )


def test_the_first_load_writes_the_weights_as_external_data_and_later_loads_map_them(tmp_path: Path) -> None:
    folder, cache = tmp_path / "m" / "1", tmp_path / "cache"
    table = write_onnx_table(folder, 2, seed=0)
    settings = _settings(cache)
    assert not maps_weights(folder, settings)
    assert np.array_equal(_predict(folder, settings), table[ROWS])
    [entry] = _entries(cache)
    weights = entry / WEIGHTS
    assert weights.stat().st_size >= table.nbytes  # the table left model.onnx
    assert (entry / "model.onnx").stat().st_size < 64 * 1024
    assert maps_weights(folder, settings)
    written = weights.stat().st_mtime_ns
    assert np.array_equal(_predict(folder, settings), table[ROWS])
    assert weights.stat().st_mtime_ns == written  # built from the copy, not written again
    assert _entries(cache) == [entry]


def test_a_changed_model_file_gets_a_new_copy(tmp_path: Path) -> None:
    folder, cache = tmp_path / "m" / "1", tmp_path / "cache"
    write_onnx_table(folder, 2, seed=0)
    settings = _settings(cache)
    _predict(folder, settings)
    changed = write_onnx_table(folder, 2, seed=1)
    os.utime(folder / "model.onnx", ns=(1, 1))  # a new mtime even on a coarse clock
    assert not maps_weights(folder, settings)
    assert np.array_equal(_predict(folder, settings), changed[ROWS])
    assert len(_entries(cache)) == 1


def test_a_file_changed_beside_the_model_makes_its_copy_stale(tmp_path: Path) -> None:
    folder, cache = tmp_path / "m" / "1", tmp_path / "cache"
    write_onnx_table(folder, 2, seed=0)
    settings = _settings(cache)
    _predict(folder, settings)
    assert maps_weights(folder, settings)
    (folder / "model.onnx.data").write_bytes(b"external data the graph may name")
    assert not maps_weights(folder, settings)


def test_writing_a_copy_removes_those_of_models_gone(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_onnx_table(tmp_path / "a" / "1", 2, seed=0)
    write_onnx_table(tmp_path / "b" / "1", 2, seed=1)
    settings = _settings(cache)
    _predict(tmp_path / "a" / "1", settings)
    (tmp_path / "a" / "1" / "model.onnx").unlink()
    _predict(tmp_path / "b" / "1", settings)
    assert len(_entries(cache)) == 1
    assert maps_weights(tmp_path / "b" / "1", settings)


@pytest.mark.parametrize("share", [False, True])
def test_no_copy_without_share_weights_or_for_a_small_model(tmp_path: Path, share: bool) -> None:
    cache = tmp_path / "cache"
    write_onnx_table(tmp_path / "big" / "1", 2, seed=0)
    write_onnx_affine(tmp_path / "small" / "1", 2.0)
    RUNTIME.load(tmp_path / "small" / "1", _settings(cache, share)).close()
    if not share:
        _predict(tmp_path / "big" / "1", _settings(cache, share))
    assert _entries(cache) == []


def test_a_cache_that_cannot_be_written_leaves_the_model_parsed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, cache = tmp_path / "m" / "1", tmp_path / "cache"
    table = write_onnx_table(folder, 2, seed=0)
    cache.write_text("a file where the folder would be")
    with caplog.at_level(logging.WARNING, logger="inferd.runtimes.onnx"):
        assert np.array_equal(_predict(folder, _settings(cache)), table[ROWS])
    assert "weights not mapped (no copy written to" in caplog.text
    assert str(cache / DERIVED) in caplog.text


def test_a_copy_that_does_not_load_is_removed_and_the_model_itself_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, cache = tmp_path / "m" / "1", tmp_path / "cache"
    table = write_onnx_table(folder, 2, seed=0)
    settings = _settings(cache)
    _predict(folder, settings)
    [entry] = _entries(cache)
    (entry / WEIGHTS).write_bytes(b"")  # cut short: onnxruntime cannot read the weights
    with caplog.at_level(logging.WARNING, logger="inferd.runtimes.onnx"):
        assert np.array_equal(_predict(folder, settings), table[ROWS])
    assert "does not load" in caplog.text
    assert not entry.exists()
    assert np.array_equal(_predict(folder, settings), table[ROWS])  # and a new copy is written
    assert maps_weights(folder, settings)


def test_the_download_cache_leaves_the_derived_folder_alone(tmp_path: Path) -> None:
    folder, cache = tmp_path / "m" / "1", tmp_path / "cache"
    write_onnx_table(folder, 2, seed=0)
    _predict(folder, _settings(cache))
    ModelCache(cache, 1)  # removes anything it takes for an interrupted download
    assert maps_weights(folder, _settings(cache))


def test_loads_racing_for_one_copy_write_it_once_and_all_map_it(tmp_path: Path) -> None:
    """Workers loading a model at once (``--workers``): the first writes the copy under the
    folder's lock, the others wait for it and build their sessions from it."""
    import threading
    import time

    import onnxruntime as ort

    from inferd.runtimes import onnx_mapped

    folder, cache = tmp_path / "m" / "1", tmp_path / "cache" / DERIVED
    write_onnx_table(folder, 2, seed=0)
    builds: list[str] = []

    def build(model: str, options: object) -> object:
        builds.append(model)
        time.sleep(0.3)  # long enough for every other thread to reach the lock
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    got: list[Path] = []

    def load() -> None:
        got.append(onnx_mapped.write_copy(ort, folder / "model.onnx", cache, level, build))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    [entry] = _entries(cache.parent)
    assert got == [entry / "model.onnx"] * 3
    assert onnx_mapped.copy_of(folder / "model.onnx", cache) == entry / "model.onnx"
