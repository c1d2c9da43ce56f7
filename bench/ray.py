#!/usr/bin/env python
"""inferd on Ray Serve against ``inferd serve`` alone, on this machine, with the ``digits`` model.

Measures, with ``inferd bench`` (TF Serving REST, 1 instance per request) at concurrency 1, 8
and 64: ``inferd serve`` alone; then ``inferd ray serve`` (one replica) behind Serve's HAProxy
ingress and behind its Python proxy, each on a fresh two-node local Ray cluster, measured once the
replica has answered and ``--settle_s`` more seconds have passed (Ray's agents and Serve's first
reports take CPU for a few seconds after a deployment, on the cores the replica uses). For each proxy
it also times scaling 1 -> 2 replicas (the deploy command until both replicas run) and 2 -> 1
(until the removed replica's process is gone), measures the two replicas at
``--curve_concurrency`` (the replica-count curve: 1 and 2 replicas on the cluster's two nodes),
and times Serve's autoscaler on inferd's signals (``--min_replicas=1 --max_replicas=2``,
the other scaling flags at their defaults): from the start of ``--autoscale_s`` seconds of load at
concurrency 64 until a second replica's process exists and until Serve counts it RUNNING, then
from the end of the load until the second replica's process is gone.
Prints a Markdown table; ``--json`` keeps the raw numbers.

    .venv/bin/python -m bench.ray --duration 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.models import instances, repository_of
from tests.inferd_process import free_port
from tests.ray_cluster import LocalCluster, start_cluster

PY = sys.executable


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


def wait_running(env: dict[str, str], address: str, replicas: int, timeout_s: float = 300) -> None:
    """Until ``inferd ray status`` counts ``replicas`` replicas, all RUNNING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = subprocess.run(
            [PY, "-m", "inferd", "ray", "status", f"--address={address}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        if json.loads(done.stdout)["replica_states"] == {"RUNNING": replicas}:
            return
        time.sleep(1)
    raise RuntimeError(f"{replicas} replicas never all ran")


def on_ray(proxy: str, repo: Path, payload: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(dir=tmp))
    extra = {} if proxy == "haproxy" else {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    cluster = start_cluster(scratch, extra_env=extra)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = [
        str(repo),
        f"--address={cluster.address}",
        "--host=127.0.0.1",
        f"--rest_api_port={port}",
        f"--port={free_port()}",  # not 8500: TF Serving's gRPC port may be taken on a shared machine
        f"--proxy={proxy}",
        "--detach",
    ]

    def deploy(*scaling: str) -> None:
        subprocess.run(
            [PY, "-m", "inferd", "ray", "serve", *flags, *scaling],
            env=cluster.env,
            check=True,
            capture_output=True,
        )

    def replicas(n: int, timeout_s: float = 300) -> float:
        """Seconds until the cluster has ``n`` replica processes."""
        start = time.monotonic()
        while len(cluster.replica_pids()) != n:
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"{n} replica processes never ran")
            time.sleep(0.1)
        return time.monotonic() - start

    try:
        deploy("--num_replicas=1")
        wait_http(url)
        time.sleep(args.settle_s)  # Ray's own start-up work (agents, Serve's first reports) ends
        steps = bench(url, payload, args.concurrency, args.duration)
        if args.hold:
            print(
                f"{proxy}: {url}, cluster {cluster.address}; waiting for {args.hold}",
                file=sys.stderr,
                flush=True,
            )
            while not args.hold.exists():
                time.sleep(0.5)
            args.hold.unlink()
        start = time.monotonic()
        deploy("--num_replicas=2")
        replicas(2)
        up_s = time.monotonic() - start
        wait_running(cluster.env, cluster.address, 2)
        time.sleep(args.settle_s)
        two = bench(url, payload, args.curve_concurrency, args.duration)
        start = time.monotonic()
        deploy("--num_replicas=1")
        replicas(1)
        down_s = time.monotonic() - start
        result = {"steps": steps, "scale_up_s": up_s, "scale_down_s": down_s, "two_replicas": two}
        if args.autoscale_s:
            result["autoscale"] = autoscale(cluster, deploy, replicas, url, payload, args.autoscale_s)
        return result
    finally:
        cluster.stop()


def autoscale(
    cluster: LocalCluster,
    deploy: Callable[..., None],
    replicas: Callable[[int], float],
    url: str,
    payload: Path,
    load_s: float,
) -> dict[str, float]:
    """Seconds Serve's autoscaler took, on inferd's signals (requests in flight, loop utilization),
    to add a replica under load at concurrency 64 (to its process; to RUNNING) and to remove it
    once the load ended."""
    deploy("--min_replicas=1", "--max_replicas=2")
    wait_running(cluster.env, cluster.address, 1)
    load = subprocess.Popen(
        [
            *(PY, "-m", "inferd", "bench", url, "--model", "digits", "--payload", str(payload)),
            *("--concurrency", "64", "--duration", str(load_s), "--warmup", "0", "--json", "-"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    start = time.monotonic()
    try:
        process_s = replicas(2)
        wait_running(cluster.env, cluster.address, 2)
    except BaseException:
        load.kill()
        load.wait()
        raise
    running_s = time.monotonic() - start
    out, _ = load.communicate()
    if load.returncode or running_s > load_s:
        raise RuntimeError(f"no second replica ran within the {load_s} s of load (status {load.returncode})")
    errors = sum(json.loads(out)["steps"][0]["errors"].values())
    return {"up_process_s": process_s, "up_running_s": running_s, "down_s": replicas(1), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--curve_concurrency", default="64", help="concurrency of the two-replica measurement"
    )
    parser.add_argument(
        "--settle_s",
        type=float,
        default=10.0,
        help="seconds between a replica answering and the measurement, for the cluster to go quiet",
    )
    parser.add_argument(
        "--hold",
        type=Path,
        help="after measuring each proxy, wait until this file exists, then delete it (to profile)",
    )
    parser.add_argument(
        "--proxies", default="haproxy,python", help="Serve ingresses to measure, comma-separated"
    )
    parser.add_argument(
        "--autoscale_s",
        type=float,
        default=40.0,
        help="seconds of load for the autoscaling measurement (0: skip it)",
    )
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
        for proxy in args.proxies.split(","):
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
                f"| {name} | {s['level']:g} | {s['requests_per_s']:,.0f} | {s['latency_ms']['p50']:.1f} | "
                f"{s['latency_ms']['p99']:.1f} | {sum(s['errors'].values())} | {ratio:.0%} |"
            )
    for name, result in results.items():
        if "two_replicas" in result:
            one = {s["level"]: s["requests_per_s"] for s in result["steps"]}
            for s in result["two_replicas"]:
                print(
                    f"\n{name}: two replicas at concurrency {s['level']:g}: {s['requests_per_s']:,.0f} req/s "
                    f"(one replica: {one.get(s['level'], 0):,.0f})"
                )
        if "scale_up_s" in result:
            print(
                f"\n{name}: scale 1 -> 2 in {result['scale_up_s']:.1f} s, "
                f"2 -> 1 in {result['scale_down_s']:.1f} s"
            )
        if "autoscale" in result:
            auto = result["autoscale"]
            print(
                f"\n{name}: autoscaling under load, a second replica's process after "
                f"{auto['up_process_s']:.1f} s, RUNNING after {auto['up_running_s']:.1f} s; "
                f"gone {auto['down_s']:.1f} s after the load; {auto['errors']} errors"
            )


if __name__ == "__main__":
    main()
