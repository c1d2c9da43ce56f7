"""The ``inferd`` command's own behaviour: busy ports, mistyped flags, ``--version``."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.models import write_onnx_affine, write_python_model


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


def test_a_port_taken_while_the_models_load_fails_the_start_with_exit_2(tmp_path: Path) -> None:
    """Another server that binds with SO_REUSEADDR can take the REST port inferd bound before its
    models loaded: inferd must then say so and exit, not serve gRPC alone claiming REST too."""
    slow = (
        "def load(self):\n    import time\n    time.sleep(3)\ndef predict(self, inputs):\n    return inputs\n"
    )
    write_python_model(tmp_path / "repo" / "m" / "1", slow)
    rest = free_port()
    argv = [sys.executable, "-m", "inferd", "serve", str(tmp_path / "repo"), "--host=127.0.0.1"]
    server = subprocess.Popen(
        [*argv, f"--rest_api_port={rest}", f"--port={free_port()}"], stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1.5)  # bound, loading
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.bind(("127.0.0.1", rest))
            other.listen()
            _, stderr = server.communicate(timeout=30)
    finally:
        server.kill()
        server.wait()
    assert server.returncode == 2, stderr
    assert f"inferd: cannot listen for REST on 127.0.0.1:{rest} (--rest_api_port); another program" in stderr
    assert "listening on" not in stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_one_port_for_grpc_and_rest_is_refused(tmp_path: Path, workers: str) -> None:
    write_onnx_affine(tmp_path / "repo" / "affine" / "1", scale=2.0)
    port = free_port()
    argv = ["serve", str(tmp_path / "repo"), "--host=127.0.0.1", f"--rest_api_port={port}", f"--port={port}"]
    done = inferd(*argv, f"--workers={workers}", timeout_s=30)
    assert done.returncode == 2, done.stderr
    assert (
        f"inferd: --port and --rest_api_port are both {port}: gRPC and REST need a port each" in done.stderr
    )


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
