#!/usr/bin/env python
"""Soak: inferd under steady, moderate load for a long time; its memory, file descriptors and
threads must not grow. Opt-in (not CI): the benchmark suite runs the 5-minute version.

    .venv/bin/python -m bench.soak                    # one hour
    .venv/bin/python -m bench.soak --duration 300     # the benchmark suite's 5 minutes

One ``inferd serve`` (the ``cnn`` model of models.py, as in protocols.py) gets an open-loop load from ``inferd
bench``, one process per protocol (V2 REST and V2 gRPC by default) sharing ``--rate``. Every
``--every`` seconds the server's process tree is sampled: RSS, open file descriptors
(``/proc/<pid>/fd``) and threads. Samples from the first ``--settle`` seconds (allocator arenas,
thread pools and connections filling up) are reported but not judged. Of the rest, the median of
the first and of the last tenth are "start" and "end", and a least-squares line gives the slope.
The run fails (exit 1) when end - start exceeds a bound (``--max-rss-growth-mb``,
``--max-fd-growth``, ``--max-thread-growth``) or any request failed. The figures replace the
``<!-- soak: ... -->`` section of docs/benchmarks.md (``--no-docs`` leaves it alone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import models, procs, report
from bench.protocols import DOCS, MODEL, Ports, start_server
from bench.run import WORK, log

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


SECTION_START = "<!-- soak: written by bench/soak.py -->"
SECTION_END = "<!-- /soak -->"
INFERD = Path(sys.prefix) / "bin" / "inferd"


@dataclass(frozen=True)
class Sample:
    """The server tree at one moment: seconds since the load started, RSS, fds, threads."""

    t: float
    rss: int
    fds: int
    threads: int


def sample(pids: set[int], t: float) -> Sample:
    rss = fds = threads = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # the process ended between listing and reading
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss += int(fields["VmRSS"].split()[0]) * 1024
        threads += int(fields["Threads"])
    return Sample(t, rss, fds, threads)


def trend(samples: list[Sample], key: str, settle_s: float) -> dict[str, float]:
    """Start/end (medians of the first and last tenth after ``settle_s``), max, growth and the
    least-squares slope per hour of one measure."""
    judged = [s for s in samples if s.t >= settle_s] or samples
    values = [float(getattr(s, key)) for s in judged]
    tenth = max(1, len(values) // 10)
    start, end = statistics.median(values[:tenth]), statistics.median(values[-tenth:])
    times = [s.t for s in judged]
    slope = statistics.linear_regression(times, values).slope if len(set(times)) > 1 else 0.0
    return {
        "first": float(getattr(samples[0], key)),
        "start": start,
        "end": end,
        "max": max(float(getattr(s, key)) for s in samples),
        "growth": end - start,
        "slope_per_hour": slope * 3600,
    }


def start_load(protocol: str, ports: Ports, rate: float, duration: float) -> subprocess.Popen[bytes]:
    url = f"127.0.0.1:{ports.grpc}" if "grpc" in protocol else ports.base
    cmd = [str(INFERD), "bench", url, f"--model={MODEL}", f"--protocol={protocol}", f"--rate={rate:g}"]
    cmd += [f"--duration={duration:g}", "--warmup=0", "--json=-"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = WORK / "soak"
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "models"
    models.repository_of(repo, MODEL, WORK / "models")
    server, ports = start_server(repo, work)
    try:
        idle = sample(server.pids(), 0.0)
        rate = args.rate / len(args.protocols)
        loads = {p: start_load(p, ports, rate, args.duration) for p in args.protocols}
        over = ", ".join(args.protocols)
        log(f"inferd pid {server.pid}: {args.rate:g} req/s over {over} for {args.duration:g} s")
        samples, began = [], time.monotonic()
        while any(load.poll() is None for load in loads.values()):
            if not server.alive():
                raise RuntimeError(f"inferd exited during the soak:\n{server.log_tail()}")
            samples.append(sample(server.pids(), time.monotonic() - began))
            if len(samples) % max(1, int(60 / args.every)) == 0:
                last = samples[-1]
                log(
                    f"t={last.t:5.0f} s rss {last.rss / 2**20:6.1f} MiB fds {last.fds} threads {last.threads}"
                )
            time.sleep(args.every)
        steps = {}
        for protocol, load in loads.items():
            out, err = load.communicate()
            if load.returncode != 0:
                raise RuntimeError(
                    f"inferd bench --protocol={protocol} failed:\n{err.decode(errors='replace')}"
                )
            steps[protocol] = json.loads(out)["steps"][0]
        after = sample(server.pids(), time.monotonic() - began)
    finally:
        server.stop()
    settle = min(args.settle, args.duration / 3)
    trends = {key: trend(samples, key, settle) for key in ("rss", "fds", "threads")}
    bounds = {
        "rss": args.max_rss_growth_mb * 2**20,
        "fds": args.max_fd_growth,
        "threads": args.max_thread_growth,
    }
    requests = sum(int(s["requests"]) for s in steps.values())
    failed = sum(sum(s["errors"].values()) for s in steps.values())
    verdicts = {key: trends[key]["growth"] <= bound for key, bound in bounds.items()}
    verdicts["requests"] = failed == 0
    return {
        "command": args.command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "noise_note": args.noise_note,
        "duration_s": args.duration,
        "rate": args.rate,
        "protocols": args.protocols,
        "every_s": args.every,
        "settle_s": settle,
        "bounds": bounds,
        "idle": idle.__dict__,
        "after": after.__dict__,
        "requests": requests,
        "failed": failed,
        "steps": steps,
        "trends": trends,
        "verdicts": verdicts,
        "passed": all(verdicts.values()),
        "samples": [s.__dict__ for s in samples],
    }


def _measure(key: str, value: float) -> str:
    return f"{value / 2**20:.1f} MiB" if key == "rss" else f"{value:.0f}"


def section(runs: dict[str, dict[str, Any]]) -> str:
    """The docs section: one table per run kept in bench/results/soak-*.json."""
    out = [
        SECTION_START,
        "## Soak",
        "",
        "inferd under a steady open-loop load from `inferd bench` (`bench/soak.py`), its process tree "
        'sampled every few seconds; "start" and "end" are the medians of the first and last tenth '
        "of the samples after the settling time, the slope a least-squares fit over the same samples.",
    ]
    for name, r in sorted(runs.items(), key=lambda item: item[1]["duration_s"]):
        out += [
            "",
            f"### {r['duration_s'] / 60:g} minutes ({name}): {'PASS' if r['passed'] else 'FAIL'}",
            "",
            f"`{r['command']}`, {r['date']}, {r['cpus']} CPUs. {r['noise_note']}",
            f"{r['rate']:g} requests/s over {', '.join(r['protocols'])}: {r['requests']:,} requests, "
            f"{r['failed']} failed; p99 "
            + ", ".join(f"{p} {s['latency_ms']['p99']:.2f} ms" for p, s in r["steps"].items())
            + f". Judged after {r['settle_s']:g} s of settling.",
            "",
            "| measure | idle | start | end | max | growth | slope per hour | bound on growth | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, label in (("rss", "RSS"), ("fds", "open fds"), ("threads", "threads")):
            t = r["trends"][key]
            out.append(
                f"| {label} | {_measure(key, r['idle'][key])} | {_measure(key, t['start'])} | "
                f"{_measure(key, t['end'])} | {_measure(key, t['max'])} | {_measure(key, t['growth'])} | "
                f"{_measure(key, t['slope_per_hour'])} | {_measure(key, r['bounds'][key])} | "
                f"{'pass' if r['verdicts'][key] else 'FAIL'} |"
            )
    out += ["", "Raw samples: `bench/results/soak-*.json`.", SECTION_END]
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3600.0, help="seconds of load (default: 3600)")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second in all (default: 100)")
    p.add_argument(
        "--protocols", nargs="+", default=["v2", "v2-grpc"], help="inferd bench protocols sharing the rate"
    )
    p.add_argument("--every", type=float, default=5.0, help="seconds between samples (default: 5)")
    p.add_argument("--settle", type=float, default=60.0, help="seconds not judged at the start (default: 60)")
    p.add_argument("--max-rss-growth-mb", type=float, default=32.0, help="bound on RSS growth (default: 32)")
    p.add_argument("--max-fd-growth", type=int, default=8, help="bound on open-fd growth (default: 8)")
    p.add_argument("--max-thread-growth", type=int, default=4, help="bound on thread growth (default: 4)")
    p.add_argument(
        "--noise-note",
        default="The machine had no other load that this script knows of.",
        help="what to say about other load on the machine",
    )
    p.add_argument("--no-docs", action="store_true", help="print the figures; leave results and docs alone")
    a = p.parse_args()
    a.command = shlex.join([".venv/bin/python", "-m", "bench.soak", *sys.argv[1:]])
    return a


def main() -> int:
    args = parse_args()
    procs.install_cleanup()
    result = soak(args)
    for key, t in result["trends"].items():
        figures = " ".join(
            f"{name} {_measure(key, t[name])}" for name in ("start", "end", "max", "slope_per_hour")
        )
        log(f"{key}: {figures} -> {'pass' if result['verdicts'][key] else 'FAIL'}")
    verdict = "PASS" if result["passed"] else "FAIL"
    log(f"requests {result['requests']:,}, failed {result['failed']}: {verdict}")
    if not args.no_docs:
        out = BENCH / "results" / f"soak-{args.duration:g}s.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        runs = {p.stem: json.loads(p.read_text()) for p in sorted((BENCH / "results").glob("soak-*.json"))}
        report.replace_section(DOCS, section(runs))
        log(f"wrote {out.relative_to(ROOT)} and {DOCS.relative_to(ROOT)}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
