#!/usr/bin/env python
"""inferd on Ray Serve against ``inferd serve`` alone, on this machine, with the ``digits`` model.

Measures, with ``inferd bench`` (TF Serving REST, 1 instance per request) at concurrency 1, 8
and 64: ``inferd serve`` alone; then ``inferd ray serve`` (one replica) behind Serve's HAProxy
ingress and behind its Python proxy, each on a fresh two-node local Ray cluster. For each proxy
it also times scaling 1 -> 2 replicas (the deploy command until both replicas run) and 2 -> 1
(until the removed replica's process is gone). Prints a Markdown table; ``--json`` keeps the raw
numbers.

    .venv/bin/python -m bench.ray --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.models import instances, repository_of
from tests.inferd_process import free_port

PY = sys.executable
RAY = str(Path(PY).parent / "ray")


def bench(url: str, payload: Path, concurrency: str, duration: float) -> list[dict[str, Any]]:
    done = subprocess.run(
        [
            *(PY, "-m", "inferd", "bench", url, "--model", "digits", "--payload", str(payload)),
            *("--concurrency", concurrency, "--duration", str(duration), "--warmup", "1", "--json", "-"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    steps: list[dict[str, Any]] = json.loads(done.stdout)["steps"]
    return steps


def wait_http(url: str, timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/v1/models/digits", timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} never answered")


def replica_pids() -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                count += (entry / "cmdline").read_bytes().startswith(b"ray::ServeReplica:inferd")
            except OSError:
                continue
    return count


def on_ray(proxy: str, repo: Path, payload: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    gcs, port = free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if proxy == "haproxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        env["RAY_SERVE_HAPROXY_SOCKET_PATH"] = str(tmp / "hap.sock")
        env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] = str(tmp / "hap.cfg")
    common = ["--num-cpus=1", "--disable-usage-stats"]
    subprocess.run(
        [RAY, "start", "--head", f"--port={gcs}", "--include-dashboard=false", *common],
        env=env,
        check=True,
        capture_output=True,
    )
    address = f"127.0.0.1:{gcs}"
    subprocess.run([RAY, "start", f"--address={address}", *common], env=env, check=True, capture_output=True)
    url = f"http://127.0.0.1:{port}"
    flags = [
        str(repo),
        f"--address={address}",
        "--host=127.0.0.1",
        f"--rest_api_port={port}",
        f"--proxy={proxy}",
        "--detach",
    ]

    def deploy(replicas: int) -> None:
        subprocess.run(
            [PY, "-m", "inferd", "ray", "serve", *flags, f"--num_replicas={replicas}"],
            env=env,
            check=True,
            capture_output=True,
        )

    try:
        deploy(1)
        wait_http(url)
        steps = bench(url, payload, args.concurrency, args.duration)
        start = time.monotonic()
        deploy(2)
        while replica_pids() < 2:
            time.sleep(0.1)
        up_s = time.monotonic() - start
        start = time.monotonic()
        deploy(1)
        while replica_pids() > 1:
            time.sleep(0.1)
        down_s = time.monotonic() - start
        return {"steps": steps, "scale_up_s": up_s, "scale_down_s": down_s}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, check=False)
        for entry in Path("/proc").iterdir():  # ray stop leaves Serve's HAProxy running
            try:
                if entry.name.isdigit() and str(tmp).encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), 9)
            except OSError:
                continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rb", dir="/tmp") as scratch:
        tmp = Path(scratch)
        repo = tmp / "repo"
        repository_of(repo, "digits", tmp / "built")
        payload = tmp / "body.json"
        payload.write_text(json.dumps({"instances": instances("digits", 1).tolist()}))
        port = free_port()
        alone = subprocess.Popen(
            [
                PY,
                "-m",
                "inferd",
                "serve",
                str(repo),
                "--host=127.0.0.1",
                f"--rest_api_port={port}",
                "--port=0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}")
            results: dict[str, Any] = {
                "inferd serve": {
                    "steps": bench(f"http://127.0.0.1:{port}", payload, args.concurrency, args.duration)
                }
            }
        finally:
            alone.terminate()
            alone.wait()
        for proxy in ("haproxy", "python"):
            results[f"ray serve ({proxy})"] = on_ray(proxy, repo, payload, args, tmp)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    base = {s["level"]: s["requests_per_s"] for s in results["inferd serve"]["steps"]}
    print("| server | concurrency | req/s | p50 ms | p99 ms | errors | vs inferd serve |")
    print("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        for s in result["steps"]:
            ratio = s["requests_per_s"] / base[s["level"]] if base.get(s["level"]) else 0
            print(
                f"| {name} | {s['level']} | {s['requests_per_s']:,.0f} | {s['latency_ms']['p50']:.1f} | "
                f"{s['latency_ms']['p99']:.1f} | {sum(s['errors'].values())} | {ratio:.0%} |"
            )
    for name, result in results.items():
        if "scale_up_s" in result:
            print(
                f"\n{name}: scale 1 -> 2 in {result['scale_up_s']:.1f} s, "
                f"2 -> 1 in {result['scale_down_s']:.1f} s"
            )


if __name__ == "__main__":
    main()
