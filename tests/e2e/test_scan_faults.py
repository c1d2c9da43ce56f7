"""Repository scans that meet faults, against a real server: a model folder behind a broken
link, a version entry that is a broken link, an ``inferd.toml`` that is a FIFO (reading it would
block the scan forever), and a version copied onto a full disk. Each is logged, the versions
already served keep serving, scans go on for the other models, and the next scan after the fault
is gone picks up where it left off. (Tests run as root, so permission bits deny nothing: these
are faults that deny root too.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess
from tests.models import write_onnx_affine


def answer(server: ServerProcess, model: str) -> float:
    """The first output value for an input of ones: the serving version's scale."""
    response = requests.post(
        f"{server.url}/v1/models/{model}:predict", json={"instances": [[1, 1, 1, 1]]}, timeout=10
    )
    assert response.status_code == 200, response.text
    return float(response.json()["predictions"][0][0])


def serves(server: ServerProcess, model: str, scale: float) -> Callable[[], bool]:
    return lambda: answer(server, model) == scale


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """``linked`` (scale 2) is a link to a folder outside the repository; ``plain`` has scale 3."""
    write_onnx_affine(tmp_path / "outside" / "linked" / "1", scale=2.0)
    (tmp_path / "repo").mkdir()
    os.symlink(tmp_path / "outside" / "linked", tmp_path / "repo" / "linked")
    write_onnx_affine(tmp_path / "repo" / "plain" / "1", scale=3.0)
    return tmp_path / "repo"


def test_a_model_folder_behind_a_broken_link_keeps_serving(
    repo: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(str(repo))
    assert answer(server, "linked") == 2.0
    (tmp_path / "outside" / "linked").rename(tmp_path / "outside" / "gone")
    server.wait_for(lambda: "model linked: cannot list" in server.log(), "the fault in the log")
    write_onnx_affine(repo / "plain" / "2", scale=5.0)
    server.wait_for(serves(server, "plain", 5.0), "scans to go on for the other model")
    assert answer(server, "linked") == 2.0
    (tmp_path / "outside" / "gone").rename(tmp_path / "outside" / "linked")
    server.wait_for(lambda: "model linked: its folder can be read again" in server.log(), "recovery")
    write_onnx_affine(tmp_path / "outside" / "linked" / "2", scale=4.0)
    server.wait_for(serves(server, "linked", 4.0), "a new version once the folder is back")


def test_a_served_version_behind_a_broken_link_keeps_serving_and_no_older_one_loads(
    repo: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Were the broken link read as a removed version, the server would load version 1 and
    unload version 2: a silent rollback."""
    write_onnx_affine(tmp_path / "mounted" / "2", scale=7.0)
    os.symlink(tmp_path / "mounted" / "2", repo / "plain" / "2")
    server = start_server(str(repo))
    assert answer(server, "plain") == 7.0
    (tmp_path / "mounted").rename(tmp_path / "unmounted")
    server.wait_for(lambda: "plain/2" in server.log(), "the fault, naming the entry, in the log")
    write_onnx_affine(repo / "linked" / "2", scale=4.0)
    server.wait_for(serves(server, "linked", 4.0), "scans to go on for the other model")
    assert answer(server, "plain") == 7.0
    assert server.status("plain") == {"2": "AVAILABLE"}
    (tmp_path / "unmounted").rename(tmp_path / "mounted")
    write_onnx_affine(repo / "plain" / "3", scale=9.0)
    server.wait_for(serves(server, "plain", 9.0), "a new version once the link resolves again")


def test_an_inferd_toml_that_is_a_fifo_does_not_block_scans(
    repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(str(repo))
    os.mkfifo(repo / "plain" / "inferd.toml")
    server.wait_for(lambda: "is not a regular file" in server.log(), "the fault in the log")
    write_onnx_affine(repo / "linked" / "2", scale=4.0)
    server.wait_for(serves(server, "linked", 4.0), "scans to go on for the other model")
    assert answer(server, "plain") == 3.0
    (repo / "plain" / "inferd.toml").unlink()
    write_onnx_affine(repo / "plain" / "2", scale=6.0)
    server.wait_for(serves(server, "plain", 6.0), "a new version once the file is gone")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs the right to mount, as root in most containers)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk is full (OSError)."""
    with path.open("wb", buffering=0) as filler:
        while True:
            filler.write(b"\0" * 4096)


def test_a_version_copied_onto_a_full_disk_fails_alone_and_loads_once_completed(
    small_disk: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_onnx_affine(small_disk / "model" / "1", scale=3.0)
    server = start_server(f"--model_base_path={small_disk / 'model'}", "--model_name=model")
    write_onnx_affine(tmp_path / "staging", scale=8.0)
    (small_disk / "model" / "2").mkdir()
    with pytest.raises(OSError, match="No space left"):
        fill(small_disk / "filler")
    with pytest.raises(OSError, match="No space left"):
        shutil.copyfile(tmp_path / "staging" / "model.onnx", small_disk / "model" / "2" / "model.onnx")
    server.wait_for(lambda: server.status("model").get("2") == "END", "the cut-short version to fail")
    assert answer(server, "model") == 3.0
    (small_disk / "filler").unlink()
    shutil.copyfile(tmp_path / "staging" / "model.onnx", small_disk / "model" / "2" / "model.onnx")
    server.wait_for(lambda: server.status("model").get("2") == "AVAILABLE", "the completed version")
    assert answer(server, "model") == 8.0
