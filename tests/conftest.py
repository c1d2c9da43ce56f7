"""Shared fixtures: free ports, temporary model repositories, and a real ``inferd serve`` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running ``python -m inferd serve``, the base URL of its REST API and the ``host:port`` of
    its gRPC API."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    grpc_target: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, model: str) -> dict[str, str]:
        """Version -> state, for every version the server reports (empty if unknown)."""
        response = requests.get(f"{self.url}/v1/models/{model}", timeout=5)
        if response.status_code == 404:
            return {}
        response.raise_for_status()
        return {s["version"]: s["state"] for s in response.json()["model_version_status"]}

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        """Poll ``predicate`` until it holds; fail with ``what`` and the server log if it never does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode} waiting for {what}:\n{self.log()}")
            if predicate():
                return
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}:\n{self.log()[-4000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _reachable(url: str) -> bool:
    try:
        requests.get(f"{url}/v1/models/_", timeout=1)
    except requests.ConnectionError:
        return False
    return True


def launch(log_dir: Path, *args: str, poll_s: float = 0.0, wait: bool = True) -> ServerProcess:
    """Start ``python -m inferd serve ARGS`` on free REST and gRPC ports; with ``wait``, until the
    REST port answers (the gRPC port opens before it).

    ``poll_s`` is ``--file_system_poll_wait_seconds`` unless ARGS set it: 0 (scan once) suits
    tests that never change the repository; hot-reload tests pass a short period.
    """
    port, grpc_port = free_port(), free_port()
    while grpc_port == port:
        grpc_port = free_port()
    log_path = log_dir / f"server-{port}.log"
    argv = [sys.executable, "-m", "inferd", "serve", "--host=127.0.0.1", f"--rest_api_port={port}"]
    argv.append(f"--port={grpc_port}")
    if not any(a.startswith("--file_system_poll_wait_seconds") for a in args):
        argv.append(f"--file_system_poll_wait_seconds={poll_s}")
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*argv, *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, f"127.0.0.1:{grpc_port}")
    if wait:
        try:
            server.wait_for(lambda: _reachable(server.url), "the REST port to open", timeout_s=60)
        except BaseException:
            server.stop()
            raise
    return server


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``inferd serve`` with the given arguments (see ``launch``), polling every 0.2 s so
    that hot-reload tests run fast; every server started is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(*args: str, wait: bool = True) -> ServerProcess:
        server = launch(tmp_path, *args, poll_s=0.2, wait=wait)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
