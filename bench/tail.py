"""The latency tail at saturation, and what the run before it has to do with it.

    .venv/bin/python -m bench.tail [--rounds 2]

``inferd serve`` (digits) pinned to CPU 0, loaded at 64 connections by ``wrk -t1`` on CPU 1 for
6 s, a fresh server for every row. The rows differ in what came before the measured run:

- ``after``: a 2 s wrk run right before (what ``bench.run`` does to warm a server up); that run
  ends by dropping its 64 connections, some with requests in flight;
- ``pause 2s`` / ``pause 7s``: the same with a pause between the two runs, shorter and longer
  than the 5 s ``--keep_alive_timeout_s``;
- ``keep-alive 1s, pause 2s``: a pause longer than a 1 s keep-alive timeout;
- ``fresh``: nothing before;
- ``after, 15 s``: as ``after``, measured for 15 s;
- ``inferd bench``: ``inferd bench``'s closed loop, whose warm-up runs on the connections it then
  measures (no connection dropped before).

Reported: requests/s, p50, p99, p99.9 and the slowest request. Results go to stdout and
bench/results/tail.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.front_end import digits_workspace, wait_answering, wrk
from tests.inferd_process import free_port

RESULTS = Path(__file__).parent / "results" / "tail.json"


@dataclass(frozen=True)
class Row:
    name: str
    pause_s: float | None  # between the 2 s wrk run and the measured one; None: no run before
    seconds: int = 6
    flags: tuple[str, ...] = ()
    loadgen: str = "wrk"


ROWS = (
    Row("after", 0.0),
    Row("pause 2s", 2.0),
    Row("pause 7s", 7.0),
    Row("keep-alive 1s, pause 2s", 2.0, flags=("--keep_alive_timeout_s=1",)),
    Row("fresh", None),
    Row("after, 15 s", 0.0, seconds=15),
    Row("inferd bench", None, loadgen="inferd bench"),
)


def _inferd_bench(port: int, seconds: float) -> dict[str, Any]:
    """``inferd bench``'s step at 64 connections, warmed up 2 s on the same connections."""
    argv = ["taskset", "-c", "1", sys.executable, "-m", "inferd", "bench", f"http://127.0.0.1:{port}"]
    argv += ["--model=digits", "--concurrency=64", f"--duration={seconds}", "--warmup=2"]
    out = subprocess.run([*argv, "--metrics_url=", "--json=-"], capture_output=True, text=True, check=True)
    (step,) = json.loads(out.stdout)["steps"]
    latency = step["latency_ms"]
    return {
        "requests_per_s": step["requests_per_s"],
        "p50_ms": latency["p50"],
        "p99_ms": latency["p99"],
        "p999_ms": latency["p99.9"],
        "max_ms": latency["max"],
    }


def measure(row: Row, repo: Path, body: Path, work: Path) -> dict[str, Any]:
    """A fresh ``inferd serve``, what ``row`` runs before, and its measured run."""
    port = free_port()
    cmd = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "inferd",
        "serve",
        str(repo),
        f"--rest_api_port={port}",
    ]
    cmd += [f"--port={free_port()}", "--host=127.0.0.1", *row.flags]
    server = procs.ServerProcess(cmd, work, dict(os.environ), work / "server.log")
    url = f"http://127.0.0.1:{port}/v1/models/digits:predict"
    try:
        wait_answering(url, body.read_bytes(), server)
        if row.loadgen == "inferd bench":
            return {"row": row.name, **_inferd_bench(port, row.seconds)}
        if row.pause_s is not None:
            wrk(url, body, 64, 2)
            time.sleep(row.pause_s)
        result = wrk(url, body, 64, row.seconds)
        return {
            "row": row.name,
            "requests_per_s": result["requests"] / (result["duration_us"] / 1e6),
            "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "p999_ms": result["p999_us"] / 1000,
            "max_ms": result["lat_max_us"] / 1000,
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every row (default 2)")
    args = parser.parse_args()
    procs.install_cleanup()
    work, repo, body = digits_workspace("inferd-tail-")
    results = []
    for _ in range(args.rounds):
        for row in ROWS:
            r = measure(row, repo, body, work)
            results.append(r)
            print(
                f"{r['row']:26s} {r['requests_per_s']:7,.0f} req/s  p50 {r['p50_ms']:6.2f}  "
                f"p99 {r['p99_ms']:7.2f}  p99.9 {r['p999_ms']:7.2f}  max {r['max_ms']:7.1f} ms",
                flush=True,
            )
    document = {
        "command": " ".join(["python -m bench.tail", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": results,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
