"""``tests.ray_cluster``: each local cluster listens on ports of its own, so that clusters of
several test runs on one machine do not answer each other's requests."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from inferd.ray.deployment import PROXY_ENV
from tests import ray_cluster


def test_each_cluster_has_its_own_proxy_and_replica_grpc_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve's proxies bind with SO_REUSEPORT: two clusters on PROXY_ENV's fixed 8510 would share
    it, and the kernel would hand one cluster's requests to the other's proxy."""
    envs: list[dict[str, str]] = []

    def run(argv: list[str], env: dict[str, str], **_: Any) -> subprocess.CompletedProcess[str]:
        envs.append(env)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(ray_cluster.subprocess, "run", run)
    first = ray_cluster.start_cluster(tmp_path, nodes=1)
    second = ray_cluster.start_cluster(tmp_path, nodes=1)
    for cluster in (first, second):
        assert not cluster.pids()  # nothing was started
        cluster.stop()  # its HAProxy folder
    for name in ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
        assert first.env[name] != PROXY_ENV[name]
        assert first.env[name] != second.env[name]
    assert envs == [first.env, second.env]
    windows = [
        range(
            int(c.env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]),
            int(c.env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]),
        )
        for c in (first, second)
    ]
    assert not set(windows[0]) & set(windows[1])  # replicas' gRPC servers too (SO_REUSEPORT)
    assert not set(range(40000, 41001)) & (set(windows[0]) | set(windows[1]))  # Serve's default
