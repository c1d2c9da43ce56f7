"""The ``inferd`` command's own behaviour: busy ports, mistyped flags, ``--version``."""

from __future__ import annotations

import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.models import write_onnx_affine


def inferd(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferd", *args], capture_output=True, text=True, timeout=timeout_s
    )


@pytest.mark.parametrize("busy", ["rest", "grpc"])
def test_a_busy_port_fails_the_start_with_exit_2_before_claiming_to_serve(tmp_path: Path, busy: str) -> None:
    write_onnx_affine(tmp_path / "repo" / "affine" / "1", scale=2.0)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        rest, grpc = (taken, free_port()) if busy == "rest" else (free_port(), taken)
        done = inferd(
            "serve",
            str(tmp_path / "repo"),
            "--host=127.0.0.1",
            f"--rest_api_port={rest}",
            f"--port={grpc}",
        )
    flag = "--rest_api_port" if busy == "rest" else "--port"
    kind = "REST" if busy == "rest" else "gRPC"
    assert done.returncode == 2, done.stderr
    assert (
        f"inferd: cannot listen for {kind} on 127.0.0.1:{taken} ({flag}); is the port in use?" in done.stderr
    )
    assert "serving" not in done.stderr
    assert "Traceback" not in done.stderr
    assert "Errno" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["serve", "repo", "--rest_api_prot=9000"], "serve"),
        (["bench", "http://localhost:8501", "--model=m", "--concurency=4"], "bench"),
        (["batch", "m", "in.npy", "out.npy", "--batch_sise=4"], "batch"),
        (["features", "load", "t.csv", "--store=redis://x", "--entity=id", "--tll=3"], "features load"),
    ],
)
def test_a_mistyped_flag_shows_the_subcommand_usage(argv: list[str], command: str) -> None:
    done = inferd(*argv)
    assert done.returncode == 2
    assert done.stderr.startswith(f"usage: inferd {command} ")
    assert f"inferd {command}: error: unrecognized arguments: {argv[-1]}" in done.stderr


def test_version_comes_from_the_package_metadata() -> None:
    done = inferd("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"inferd {metadata.version('inferd')}"
