"""What the server logs about its repository: a model file put where a version folder belongs is
explained once, with the fix; the start-up line says truthfully what serves and what does not,
and why; a configuration file that does not read is logged once per change, and its repair too,
however often the repository is polled."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import requests

from tests.conftest import ServerProcess
from tests.models import write_onnx_affine


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` at once, so that no scan reads it half-written."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def lines(server: ServerProcess, *parts: str) -> list[str]:
    return [line for line in server.log().splitlines() if all(part in line for part in parts)]


def serves(server: ServerProcess, model: str, version: str) -> Callable[[], bool]:
    return lambda: server.status(model).get(version) == "AVAILABLE"


def test_a_model_file_outside_a_version_folder_is_explained_once_with_the_fix(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = tmp_path / "repo"
    write_onnx_affine(repo / "good" / "1", scale=1.0)
    write_onnx_affine(repo / "flat" / "1", scale=2.0)
    (repo / "flat" / "1" / "model.onnx").rename(repo / "flat" / "model.onnx")  # no version folder
    (repo / "flat" / "1").rmdir()
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    server = start_server(str(repo))
    server.wait_for(serves(server, "good", "1"), "good:1")
    # Polled every 0.2 s: by the time a new version is loaded (two scans that agree), many scans
    # have looked at the flat model again.
    write_onnx_affine(repo / "good" / "2", scale=1.0)
    server.wait_for(serves(server, "good", "2"), "good:2")

    fix = f"move model.onnx into {repo / 'flat' / '1'}/"
    (explained,) = lines(server, "ERROR inferd.repository: model flat: no version folder")
    assert f"{repo / 'flat'}, which holds model.onnx directly" in explained
    assert explained.endswith(fix)
    (started,) = lines(server, "listening on http://127.0.0.1:")
    assert " WARNING " in started
    assert "serving good (version 1); not serving " in started
    assert "broken (version 1: onnxruntime could not load model.onnx" in started
    assert f"flat (no version folder in {repo / 'flat'}" in started
    assert fix in started
    response = requests.post(f"{server.url}/v1/models/flat:predict", json={"instances": [[1] * 4]}, timeout=5)
    assert response.status_code == 404

    (repo / "flat" / "1").mkdir()
    (repo / "flat" / "model.onnx").rename(repo / "flat" / "1" / "model.onnx")  # the fix, as told
    server.wait_for(serves(server, "flat", "1"), "flat:1 after the fix")
    assert len(lines(server, "model flat: version folders found in")) == 1
    assert len(lines(server, "model flat: no version folder")) == 1


def test_a_repository_where_nothing_loaded_says_so(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = tmp_path / "repo"
    for name in ("a", "b"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(b"not a model")
    (repo / "c" / "variables").mkdir(parents=True)
    (repo / "c" / "saved_model.pb").write_bytes(b"")
    server = start_server(str(repo))
    (started,) = lines(server, "listening on http://127.0.0.1:")
    assert " ERROR inferd.server: no model loaded: a (version 1: onnxruntime could not load" in started
    assert f"move saved_model.pb and variables/ into {repo / 'c' / '1'}/" in started
    assert "serving a" not in started


def test_a_broken_inferd_toml_is_logged_once_per_change_and_its_repair_once(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    repo = tmp_path / "repo"
    write_onnx_affine(repo / "a" / "1", scale=1.0)
    write_onnx_affine(repo / "b" / "1", scale=1.0)
    settings = repo / "a" / "inferd.toml"
    settings.write_text("warmup = true\n")
    server = start_server(str(repo))
    server.wait_for(serves(server, "a", "1"), "a:1")

    write_atomically(settings, "warmup = flase\n")  # a typo
    server.wait_for(lambda: bool(lines(server, "model a:", "Invalid value")), "the typo in the log")
    write_onnx_affine(repo / "b" / "2", scale=1.0)  # a marker: loaded after several more scans
    server.wait_for(serves(server, "b", "2"), "b:2")
    assert len(lines(server, "ERROR", f"{settings}: Invalid value")) == 1
    assert server.status("a") == {"1": "AVAILABLE"}  # what loaded keeps serving

    write_atomically(settings, "warmup = 3\n")  # another mistake: the file changed, said again
    server.wait_for(lambda: bool(lines(server, "'warmup' must be true or false")), "the second mistake")
    write_onnx_affine(repo / "b" / "3", scale=1.0)
    server.wait_for(serves(server, "b", "3"), "b:3")
    assert len(lines(server, "ERROR", f"{settings}: ")) == 2

    write_atomically(settings, "warmup = true\n")
    server.wait_for(lambda: bool(lines(server, "model a: inferd.toml reads again")), "the repair")
    write_onnx_affine(repo / "b" / "4", scale=1.0)
    server.wait_for(serves(server, "b", "4"), "b:4")
    assert len(lines(server, "model a: inferd.toml reads again")) == 1
    assert len(lines(server, "ERROR", f"{settings}: ")) == 2


def test_a_broken_model_config_file_is_logged_once_per_change(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_onnx_affine(tmp_path / "a" / "1", scale=1.0)
    config = tmp_path / "models.config"
    good = f'model_config_list {{ config {{ name: "a" base_path: "{tmp_path / "a"}" }} }}\n'
    config.write_text(good)
    server = start_server(f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0.2")
    server.wait_for(serves(server, "a", "1"), "a:1")

    write_atomically(config, 'model_config_list { config { name: "a" base_path: ')  # does not parse
    server.wait_for(lambda: bool(lines(server, "keeping the previous model config")), "the parse error")
    write_onnx_affine(tmp_path / "a" / "2", scale=1.0)  # a marker: the config is re-read meanwhile
    server.wait_for(serves(server, "a", "2"), "a:2")
    assert len(lines(server, "keeping the previous model config")) == 1

    write_atomically(config, good)
    server.wait_for(lambda: bool(lines(server, f"{config} reads again")), "the repair")
    assert len(lines(server, "keeping the previous model config")) == 1
