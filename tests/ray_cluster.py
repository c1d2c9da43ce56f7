"""A local Ray cluster of real ``ray start`` nodes on this machine, for the Ray tests and
``bench/ray.py`` alike; it imports nothing from pytest.

Each cluster is isolated from any other on the machine (another engineer's, another test run's):
its own auth token (Ray turns token auth on when ``~/.ray/auth_token`` exists, and a node without
the head's token cannot join), its own HAProxy files and ports (its replicas' gRPC ports too: see
``_grpc_window``), and a marker in the environment of every process it starts. ``stop`` ends
exactly the processes that carry its marker (the nodes, their workers and Serve's HAProxy, which
``ray stop`` leaves running), never ``ray stop --force``, which ends every Ray process on the
machine.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from inferd.ray.deployment import PROXY_ENV
from tests.inferd_process import free_port

MARKER = "INFERD_TEST_RAY_CLUSTER"
"""The environment variable whose value names one cluster in all of its processes."""


@dataclass
class LocalCluster:
    """A head and ``nodes - 1`` worker nodes started with ``ray start``; ``env`` is what every
    node (and every command that joins the cluster) runs with."""

    address: str
    env: dict[str, str]
    haproxy_dir: Path

    def pids(self) -> set[int]:
        """The processes of this machine that belong to this cluster: those with its marker in
        their environment and their descendants (a process that renames itself, as Ray's agents
        and workers do, may lose its environment from ``/proc``)."""
        needle = f"{MARKER}={self.env[MARKER]}".encode()
        marked: set[int] = set()
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    marked.add(pid)
                stat = (entry / "stat").read_text()
            except OSError:  # gone, or not ours to read
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(pid)
        found, todo = set(), list(marked)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, ()))
        return found

    def replica_pids(self) -> list[int]:
        """This cluster's live inferd replica processes (Serve names them ``ray::ServeReplica:
        inferd:...``), in pid order."""
        found = []
        for pid in sorted(self.pids()):
            try:
                named = Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ServeReplica:inferd")
            except OSError:
                continue
            if named and _alive(pid):
                found.append(pid)
        return found

    def stop(self, timeout_s: float = 30.0) -> None:
        """End every process of this cluster (SIGKILL, as ``ray stop --force`` does) and wait
        until none is left alive; remove its HAProxy files."""
        deadline = time.monotonic() + timeout_s
        doomed = self.pids()  # every process found once is killed until gone: orphans lose their
        while doomed and time.monotonic() < deadline:  # parent link once their parent died
            for pid in doomed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    continue
            time.sleep(0.2)
            doomed = {pid for pid in doomed | self.pids() if _alive(pid)}
        shutil.rmtree(self.haproxy_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


GRPC_WINDOW = 32
"""Ports each cluster gives its replicas' gRPC servers (Serve's direct ingress)."""

_windows: set[int] = set()
"""The first ports of the windows this process gave out."""


def _grpc_window() -> int:
    """The first of ``GRPC_WINDOW`` ports, none in use now, outside Serve's default range
    (40000-41000) and picked at random: Serve's replicas listen for gRPC with SO_REUSEPORT, so a
    replica of another cluster on the same port would share it, and the kernel would hand this
    cluster's calls to it. Never one overlapping a window given before in this process."""
    while True:
        first = random.randrange(41000, 60000 - GRPC_WINDOW)
        if any(abs(first - given) < GRPC_WINDOW for given in _windows):
            continue
        try:
            for port in range(first, first + GRPC_WINDOW):
                with socket.socket(socket.AF_INET6) as sock:
                    sock.bind(("::", port))
        except OSError:
            continue
        _windows.add(first)
        return first


def _ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def start_cluster(
    scratch: Path, nodes: int = 2, num_cpus: int = 1, extra_env: dict[str, str] | None = None
) -> LocalCluster:
    """Start a head node and ``nodes - 1`` workers, each offering ``num_cpus`` CPUs, with
    Serve's HAProxy ingress on; ``scratch`` (a directory that exists) receives the auth token.
    On a failure to start, what was started is stopped before the error propagates.

    Raises:
        subprocess.CalledProcessError: a ``ray start`` failed (its output in the exception).
    """
    haproxy = Path(tempfile.mkdtemp(prefix="hap", dir="/tmp"))  # its socket path must be short
    gcs, client, fallback_http, fallback_grpc, stats, haproxy_metrics = _ports(6)
    grpc_ports = _grpc_window()
    token = scratch / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        **PROXY_ENV,  # first: the ports below are this cluster's own
        MARKER: secrets.token_hex(8),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_ports),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_ports + GRPC_WINDOW),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(haproxy_metrics),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
        "RAY_USAGE_STATS_ENABLED": "0",
        **(extra_env or {}),
    }
    cluster = LocalCluster(f"127.0.0.1:{gcs}", env, haproxy)
    ray = str(Path(sys.executable).parent / "ray")
    common = [f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    head = [ray, "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}"]
    try:
        subprocess.run(
            [*head, "--include-dashboard=false", *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        for _ in range(nodes - 1):
            subprocess.run(
                [ray, "start", f"--address={cluster.address}", *common],
                env=env,
                check=True,
                capture_output=True,
                timeout=180,
            )
    except BaseException:
        cluster.stop()
        raise
    return cluster
