#!/usr/bin/env python
"""``--workers N``: throughput, CPU per request and memory of inferd at 1, 2, ... workers.

    .venv/bin/python -m bench.workers [--workers 1 2] [--connections 64] [--duration 5] [--json out.json]

For each worker count, starts ``inferd serve --workers N`` on the benchmark's ``digits`` model
(v1 JSON, one instance per request) and an MLP whose 64 MiB of weights are saved as ONNX external
data, with ``[onnx] share_weights`` off and on. It measures the idle memory of the server's
process tree (PSS: pages the workers share are split between them, so the sum is what the
machine pays), then runs ``wrk -t1 -cC`` against digits and reports requests/s and the server's
CPU-seconds per 1,000 requests (utime+stime over the tree). Requests per CPU-second is the
throughput one core gives: it should not fall as N grows. The load generator shares the
machine's cores with the server: on a machine with fewer cores than N + 1, requests/s is bounded
by the cores, not by inferd, and only the CPU per request says how each worker does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import requests
from onnx import TensorProto, helper, numpy_helper

from bench.models import build_all, instances
from bench.procs import cpu_seconds, memory_bytes, tree
from tests.inferd_process import free_port

BENCH = Path(__file__).resolve().parent


def build_mlp(version_dir: Path, width: int = 2048, layers: int = 4) -> None:
    """``layers`` Gemm layers of [width, width] FP32 (16 MiB each at 2048), weights external."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    nodes, inits, previous = [], [], "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [out]))
        inits += [
            numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32) / width, f"w{i}"),
            numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"),
        ]
        previous = out
    model = helper.make_model(
        helper.make_graph(nodes, "mlp", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(
        model,
        version_dir / "model.onnx",
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )


def start(repo: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "inferd", "serve", str(repo), "--host=127.0.0.1", f"--rest_api_port={port}"]
    argv += ["--port=0", "--file_system_poll_wait_seconds=0", f"--workers={workers}", "--log_level=warning"]
    process = subprocess.Popen(argv, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            scraped = requests.get(f"{url}/metrics", timeout=2).text
            merged = re.search(r"^inferd_workers_scraped (\S+)$", scraped, re.MULTILINE)
            if workers == 1 or (merged and float(merged.group(1)) == workers):
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"inferd --workers {workers} did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def server_tree(process: subprocess.Popen[bytes]) -> set[int]:
    return tree(process.pid, process.pid, process.pid)


def wrk(url: str, connections: int, seconds: float, body: Path) -> tuple[float, int]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(BENCH / "wrk_post.lua")]
    argv += [f"{url}/v1/models/digits:predict", "--", str(body)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rate, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        digits = build_all(root / "built")["digits"]
        body = root / "body.json"
        body.write_bytes(json.dumps({"instances": instances("digits", 1).tolist()}).encode())
        for share in (False, True):
            repo = root / f"repo-share-{share}"
            (repo / "digits" / "1").mkdir(parents=True)
            (repo / "digits" / "1" / "model.onnx").write_bytes(digits.read_bytes())
            build_mlp(repo / "mlp" / "1")
            (repo / "mlp" / "inferd.toml").write_text(f"[onnx]\nshare_weights = {str(share).lower()}\n")
            for workers in args.workers:
                process, url = start(repo, workers)
                try:
                    time.sleep(1.0)  # let the loads' garbage settle
                    pids = server_tree(process)
                    row: dict[str, float | int | bool | list[float]] = {
                        "workers": workers,
                        "share_weights": share,
                    }
                    row["idle_pss_mib"] = round(memory_bytes(pids) / 2**20, 1)
                    # the supervisor (first when N > 1), then each worker
                    by_process = [process.pid, *sorted(pids - {process.pid})]
                    row["pss_by_process_mib"] = [round(memory_bytes({pid}) / 2**20, 1) for pid in by_process]
                    if not share:  # throughput does not depend on the MLP's weights
                        wrk(url, args.connections, 1.0, body)  # warm up
                        pids = server_tree(process)
                        cpu_before = cpu_seconds(pids)
                        rate, total = wrk(url, args.connections, args.duration, body)
                        cpu = cpu_seconds(pids) - cpu_before
                        row["requests_per_s"] = round(rate)
                        row["cpu_s_per_1k_requests"] = round(1000 * cpu / total, 3)
                        row["requests_per_cpu_s"] = round(total / cpu)
                        started = time.perf_counter()
                        for _ in range(20):
                            requests.get(f"{url}/metrics", timeout=5)
                        row["scrape_ms"] = round((time.perf_counter() - started) / 20 * 1000, 2)
                finally:
                    stop(process)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
