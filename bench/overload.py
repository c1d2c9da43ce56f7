#!/usr/bin/env python
"""Overload: inferd at five times its measured capacity, open loop, then back to idle.

    .venv/bin/python -m bench.overload                       # writes the docs section
    .venv/bin/python -m bench.overload --seconds 5 --no-docs

One server, one batched model whose predict call sleeps ``--batch-ms`` per batch of up to
``--batch-rows`` rows (a fixed service time, so that the capacity does not move with the load
on a shared machine). Steps: idle latency (one request at a time), capacity (closed loop, 64
callers), then ``inferd bench --rate`` at ``--factor`` times that capacity for each protocol
while a probe times the refusals and /proc samples the server's memory, then the time until a
lone request is back to its idle latency. Results go to bench/results/overload.json and to the
``overload`` section of docs/benchmarks.md. See docs/batching.md ("Load shedding") for the bound.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench import procs, report
from bench.run import machine
from inferd.loadtest import BenchOptions, StepReport
from inferd.loadtest import run as bench
from inferd.usage import read_pid
from tests.inferd_process import free_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


DOCS = ROOT / "docs" / "benchmarks.md"
SECTION_START = "<!-- overload: written by bench/overload.py -->"
SECTION_END = "<!-- /overload -->"
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 1]}]}).encode()

MODEL = """import time

import numpy as np


class Model:
    signature = {{
        "inputs": [{{"name": "x", "dtype": "float32", "shape": [-1, 2]}}],
        "outputs": [{{"name": "y", "dtype": "float32", "shape": [-1, 2]}}],
    }}
    thread_safe = True

    def load(self):
        pass

    def predict(self, inputs):
        time.sleep({seconds})
        return {{"y": inputs["x"] * 2}}
"""


def post(url: str) -> tuple[int, float, str | None]:
    """One V2 inference: status, seconds, Retry-After."""
    request = urllib.request.Request(
        f"{url}/v2/models/work/infer", BODY, {"content-type": "application/json"}, method="POST"
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status, time.perf_counter() - started, None
    except urllib.error.HTTPError as error:
        error.read()
        return error.code, time.perf_counter() - started, error.headers.get("retry-after")


def probe(url: str, stop: threading.Event, seen: list[tuple[int, float, str | None]]) -> None:
    while not stop.is_set():
        seen.append(post(url))
        stop.wait(0.01)


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def server_totals(url: str) -> dict[float, float]:
    """Cumulative counts of the server-side total time of model ``work``'s requests, by bucket."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            total = sample.name == "inferd_request_duration_seconds_bucket" and labels.get("stage") == "total"
            if total and labels.get("model") == "work":
                bound = float(labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    return counts


def server_p99_bucket(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The smallest histogram bound under which 99% of the requests between the snapshots fell."""
    diff = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = diff.get(float("inf"), 0.0)
    return next((bound for bound in sorted(diff) if total and diff[bound] >= 0.99 * total), None)


def overload(
    args: argparse.Namespace, url: str, target: str, protocol: str, pid: int, rate: float, idle_s: float
) -> dict[str, Any]:
    rss_before = read_pid(pid)[1]
    totals_before = server_totals(url)
    options = BenchOptions(
        target,
        "work",
        protocol=protocol,
        rates=(rate,),
        duration_s=args.seconds,
        warmup_s=2.0,
        timeout_s=30.0,
    )
    stop, peak = threading.Event(), rss_before
    seen: list[tuple[int, float, str | None]] = []
    prober = threading.Thread(target=probe, args=(url, stop, seen), daemon=True)
    result: list[StepReport] = []
    loader = threading.Thread(target=lambda: result.extend(bench(options)))
    loader.start()
    time.sleep(2.0)
    prober.start()
    while loader.is_alive():
        peak = max(peak, read_pid(pid)[1])
        time.sleep(0.25)
    stop.set()
    prober.join()
    ended = time.monotonic()
    server_p99 = server_p99_bucket(totals_before, server_totals(url))
    while post(url)[1] > idle_s * 1.5 and time.monotonic() - ended < 60:
        time.sleep(0.01)
    recovery_s = time.monotonic() - ended
    time.sleep(1.0)
    rss_after = read_pid(pid)[1]
    (step,) = result
    refused = [seconds for status, seconds, _ in seen if status == 503]
    return {
        "protocol": protocol,
        "offered_per_s": rate,
        "requests": step.requests,
        "accepted": step.requests - sum(step.errors.values()),
        "refused": step.errors,
        "accepted_ms": {k: None if v is None else round(v, 1) for k, v in step.latency_ms.items()},
        "server_p99_at_most_s": server_p99,
        "refusal_ms": {
            "p50": percentile_ms(refused, 50),
            "p99": percentile_ms(refused, 99),
            "probes": len(refused),
        },
        "retry_after_on_every_503": all(retry == "1" for status, _, retry in seen if status == 503),
        "rss_mib": {
            "before": round(rss_before / 2**20, 1),
            "peak": round(peak / 2**20, 1),
            "after": round(rss_after / 2**20, 1),
        },
        "recovery_s": round(recovery_s, 2),
    }


def section(results: dict[str, Any]) -> str:
    s = results["settings"]
    bound_ms = (s["max_enqueued_batches"] / s["num_batch_threads"] + 1) * s["batch_ms"] + s[
        "batch_timeout_ms"
    ]
    lines = [
        SECTION_START,
        "## Overload",
        "",
        f"Measured {results['date']} on {results['machine']['nproc']} cores ({results['machine']['cpu']}), "
        f"load average {results['load_average'][0]:.1f} before and {results['load_average'][1]:.1f} after "
        "(above ~1, other jobs shared the machine and the figures are indicative). "
        f"`bench/overload.py --seconds {s['seconds']:g}`: a batched model whose predict call takes "
        f"{s['batch_ms']:g} ms per batch of up to {s['batch_rows']} rows, "
        f"`max_enqueued_batches = {s['max_enqueued_batches']}`, "
        f"`num_batch_threads = {s['num_batch_threads']}`, "
        f"`batch_timeout_micros = {s['batch_timeout_ms'] * 1000:g}`. Idle latency "
        f"{results['idle_ms']:.1f} ms; capacity {results['capacity_per_s']:.0f} requests/s (closed loop, "
        f"64 callers); open loop (`inferd bench --rate`) at {s['factor']:g}x capacity "
        f"for {s['seconds']:g} s. "
        f"Documented bound on accepted latency (docs/batching.md): (queue / threads + 1) x batch + timeout "
        f"= {bound_ms:.0f} ms, plus protocol overhead.",
        "",
        "| protocol | offered/s | sent | accepted | refused | accepted p50 / p99 ms | server-side p99 "
        "| refusal p50 / p99 ms | RSS before / peak / after MiB | back to idle latency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        refused = ", ".join(f"{k} {v}" for k, v in r["refused"].items()) or "0"
        rss = r["rss_mib"]
        lines.append(
            f"| {r['protocol']} | {r['offered_per_s']:.0f} | {r['requests']} | {r['accepted']} | {refused} "
            f"| {r['accepted_ms']['p50']} / {r['accepted_ms']['p99']} "
            f"| <= {r['server_p99_at_most_s']} s "
            f"| {r['refusal_ms']['p50']} / {r['refusal_ms']['p99']} "
            f"| {rss['before']} / {rss['peak']} / {rss['after']} | {r['recovery_s']} s |"
        )
    lines += [
        "",
        "Accepted latency is counted by the load generator from when each request was due (no "
        "coordinated omission), so it includes the client's own delays on this shared machine; the "
        'server-side p99 is the `inferd_request_duration_seconds{stage="total"}` histogram bucket '
        "that holds 99% of the requests of the run (buckets 0.1, 0.25, 0.5, 1, 2.5 s). "
        "Refusal latency is timed by a probe (one V2 REST request every 10 ms beside the load, "
        "Python `urllib`, so it includes the client's own overhead); every 503 carried "
        f"`Retry-After: 1`: {all(r['retry_after_on_every_503'] for r in results['runs'])}.",
        SECTION_END,
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds of overload per protocol")
    p.add_argument("--factor", type=float, default=5.0, help="offered load / measured capacity")
    p.add_argument("--batch-ms", type=float, default=40.0, help="service time of one batch")
    p.add_argument("--batch-rows", type=int, default=8, help="max_batch_size")
    p.add_argument("--queue", type=int, default=8, help="max_enqueued_batches")
    p.add_argument("--protocols", nargs="+", default=["v2", "v2-grpc"], help="inferd bench protocols")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    procs.install_cleanup()
    settings = {
        "seconds": args.seconds,
        "factor": args.factor,
        "batch_ms": args.batch_ms,
        "batch_rows": args.batch_rows,
        "max_enqueued_batches": args.queue,
        "num_batch_threads": 1,
        "batch_timeout_ms": 1.0,
    }
    with tempfile.TemporaryDirectory(prefix="inferd-overload-") as tmp:
        version = Path(tmp) / "repo" / "work" / "1"
        version.mkdir(parents=True)
        (version / "model.py").write_text(MODEL.format(seconds=args.batch_ms / 1000))
        (version.parent / "inferd.toml").write_text(
            f"[batching]\nmax_batch_size = {args.batch_rows}\nbatch_timeout_micros = 1000\n"
            f"max_enqueued_batches = {args.queue}\nnum_batch_threads = 1\n"
        )
        port, grpc_port = free_port(), free_port()
        server = procs.ServerProcess(
            [
                sys.executable,
                "-m",
                "inferd",
                "serve",
                str(version.parent.parent),
                "--host=127.0.0.1",
                f"--rest_api_port={port}",
                f"--port={grpc_port}",
                "--file_system_poll_wait_seconds=0",
            ],
            ROOT,
            {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
            Path(tmp) / "server.log",
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if post(url)[0] == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            idle_s = float(np.median([post(url)[1] for _ in range(20)]))
            (capacity,) = bench(BenchOptions(url, "work", protocol="v2", concurrency=(64,), duration_s=5.0))
            rate = args.factor * capacity.requests_per_s
            print(
                f"idle {idle_s * 1000:.1f} ms, capacity {capacity.requests_per_s:.0f}/s, offer {rate:.0f}/s"
            )
            runs = []
            for protocol in args.protocols:
                target = f"127.0.0.1:{grpc_port}" if protocol.endswith("grpc") else url
                runs.append(overload(args, url, target, protocol, server.pid, rate, idle_s))
                print(json.dumps(runs[-1]))
        finally:
            server.stop()
    results = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average": (load_before, os.getloadavg()[0]),
        "settings": settings,
        "idle_ms": idle_s * 1000,
        "capacity_per_s": capacity.requests_per_s,
        "runs": runs,
    }
    (BENCH / "results" / "overload.json").write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_docs:
        report.replace_section(DOCS, section(results))
    print(section(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
