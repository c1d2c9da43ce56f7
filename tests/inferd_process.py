"""A real ``python -m inferd serve`` process on free ports, for the tests and the benchmarks alike.

The tests reach it through ``tests.conftest`` (``launch``, ``ServerProcess``, ``free_port``);
``bench/`` imports it directly. It imports nothing from pytest, so a failure to start or to reach a
state raises :class:`ServerFailed` (an ``AssertionError``, which pytest reports as a failure).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class ServerFailed(AssertionError):
    """The server exited, or never reached what was waited for; the message holds its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str, timeout_s: float) -> object:
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return json.loads(answer.read())


def version_states(url: str, model: str, timeout_s: float = 5.0) -> dict[str, str]:
    """Version -> state for every version of ``model`` that the server at ``url`` (its REST base)
    reports, from TF Serving's model status API; empty when the model is unknown (404)."""
    try:
        status = _get_json(f"{url}/v1/models/{model}", timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise
    assert isinstance(status, dict), status
    return {str(s["version"]): str(s["state"]) for s in status.get("model_version_status", [])}


def model_available(url: str, model: str) -> bool:
    """Whether the server at ``url`` answers and has some version of ``model`` AVAILABLE."""
    try:
        return "AVAILABLE" in version_states(url, model, timeout_s=2.0).values()
    except OSError:
        return False


def reachable(url: str) -> bool:
    """Whether the REST port at ``url`` answers HTTP at all (any status)."""
    try:
        _get_json(f"{url}/v1/models/_", 1.0)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


@dataclass
class ServerProcess:
    """A running ``python -m inferd serve``, the base URL of its REST API and the ``host:port`` of
    its gRPC API."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    grpc_target: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, model: str) -> dict[str, str]:
        """Version -> state, for every version the server reports (empty if unknown)."""
        return version_states(self.url, model)

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        """Poll ``predicate`` until it holds; raise :class:`ServerFailed` with ``what`` and the
        server log if the server exits or ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"server exited with {self.process.returncode} waiting for {what}:\n{self.log()}"
                )
            if predicate():
                return
            time.sleep(0.1)
        raise ServerFailed(f"timed out waiting for {what}:\n{self.log()[-4000:]}")

    def wait_available(self, model: str, timeout_s: float = 60.0) -> None:
        """Wait until some version of ``model`` is AVAILABLE."""
        self.wait_for(lambda: model_available(self.url, model), f"model {model} AVAILABLE", timeout_s)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 15 s; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def launch(
    log_dir: Path,
    *args: str,
    poll_s: float = 0.0,
    wait: bool = True,
    prefix: Sequence[str] = (),
) -> ServerProcess:
    """Start ``python -m inferd serve ARGS`` on free REST and gRPC ports; with ``wait``, until the
    REST port answers (the gRPC port opens before it). The log is ``log_dir/server-<port>.log``.

    ``poll_s`` is ``--file_system_poll_wait_seconds`` unless ARGS set it: 0 (scan once) suits
    tests that never change the repository; hot-reload tests pass a short period. ``prefix`` goes
    before the command (the benchmarks pin the server with ``taskset -c 0``).
    """
    port, grpc_port = free_port(), free_port()
    while grpc_port == port:
        grpc_port = free_port()
    log_path = log_dir / f"server-{port}.log"
    argv = [*prefix, sys.executable, "-m", "inferd", "serve", "--host=127.0.0.1", f"--rest_api_port={port}"]
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
            server.wait_for(lambda: reachable(server.url), "the REST port to open", timeout_s=60)
        except BaseException:
            server.stop()
            raise
    return server
