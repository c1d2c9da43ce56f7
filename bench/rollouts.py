#!/usr/bin/env python
"""What shadow traffic and traffic capture cost the requests they ride on.

    .venv/bin/python -m bench.rollouts [--duration 10] [--rounds 5] [--out bench/results/rollouts.json]

Serves the digits MLP (bench/models.py) as versions 1 and 2 of one model, requests routed to
version 1 by ``[traffic]``, in one server pinned to CPU 0 (``taskset``), with ``inferd bench``
(TF Serving REST, one instance a request) pinned to CPU 1. The model's ``inferd.toml`` is switched
on the fly between three settings: plain, ``[shadow] version = 2, fraction = 1.0`` (every request
mirrored) and ``[capture] fraction = 0.01``; each switch is confirmed (a label per setting) before
measuring. Each round measures every setting, in an order that alternates between rounds
(so that a drift of the machine does not favour one), with:

- the closed-loop throughput at 16 connections;
- the p50 and p99 latency at half the plain server's throughput (measured once before the
  rounds: the "half-loaded server"), offered by 16 connections that each wait 16 / rate seconds
  before each request. wrk's C client keeps its own delays out of the tail, which a Python
  open-loop generator on one core did not (its p99 moved 10x between repeats of one setting).

One server for every setting keeps process-to-process differences out of the comparison; the
pinning keeps the load generator off the server's CPU. The summary gives, per setting, the median
over rounds and each round's change against plain in the same round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from bench.models import build_digits
from tests.inferd_process import ServerProcess, launch

BENCH = Path(__file__).resolve().parent
SERVER_CPU = "0"
CLIENT_CPU = "1"
POLL_S = 0.5

# Each setting also labels version 1 with its own name: the server has applied a setting when
# that label answers and the others do not (the file is read whole, so the tables go together).
TABLES = {
    "plain": "",
    "shadow": "[shadow]\nversion = 2\nfraction = 1.0\n",
    "capture": '[capture]\npath = "captures"\nfraction = 0.01\n',
}
SETTINGS = {
    name: f'version_policy = {{ specific = [1, 2] }}\n[traffic]\n"1" = 1\n[labels]\n{name} = 1\n{table}'
    for name, table in TABLES.items()
}


def labelled(url: str, label: str) -> bool:
    """Whether the model's metadata answers for ``label`` (its status lists every version
    whatever the label, as TF Serving's)."""
    try:
        with urllib.request.urlopen(f"{url}/v1/models/digits/labels/{label}/metadata", timeout=10):
            return True
    except urllib.error.HTTPError:
        return False


def switch(server: ServerProcess, base: Path, name: str) -> None:
    """Write setting ``name`` and wait until the server has applied it."""
    (base / "inferd.toml").write_text(SETTINGS[name])
    server.wait_for(
        lambda: all(labelled(server.url, other) == (other == name) for other in SETTINGS),
        f"the setting {name} applied",
    )


def wrk(url: str, body: Path, duration: float, connections: int, pause_ms: int = 0) -> dict[str, float]:
    """``wrk -t1`` pinned to CLIENT_CPU POSTing ``body`` to the model for ``duration`` s, each
    connection waiting ``pause_ms`` before each request (0: as fast as answers come); the JSON
    line of ``wrk_post.lua``."""
    argv = ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s"]
    argv += ["--timeout", "10s", "-s", str(BENCH / "wrk_post.lua"), f"{url}/v1/models/digits:predict", "--"]
    argv += [str(body), *([str(pause_ms)] if pause_ms else [])]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRKJSON "))
    report: dict[str, float] = json.loads(line[len("WRKJSON ") :])
    errors = report["non2xx"] + report["connect_errors"] + report["read_errors"] + report["timeouts"]
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors: {line}")
    return report


def measure(url: str, body: Path, duration: float, half_rate: int) -> dict[str, float]:
    """Closed-loop throughput at 16 connections, then p50/p99 with 16 connections paced to
    ``half_rate`` requests/s in all (each waits 16 / half_rate s before each request)."""
    wrk(url, body, 1, 16)  # warm-up
    closed = wrk(url, body, duration, 16)
    paced = wrk(url, body, duration, 16, round(16_000 / half_rate))
    return {
        "throughput_rps": closed["requests"] / (closed["duration_us"] / 1e6),
        "half_load_rps": paced["requests"] / (paced["duration_us"] / 1e6),
        "half_load_p50_ms": paced["p50_us"] / 1000,
        "half_load_p99_ms": paced["p99_us"] / 1000,
    }


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per setting and figure: the median over rounds and, for the settings other than plain, the
    median of each round's change against plain in the same round (percent)."""
    summary: dict[str, dict[str, float]] = {}
    for name in SETTINGS:
        figures = rounds[0][name].keys()
        row = {f"{f}_median": statistics.median(r[name][f] for r in rounds) for f in figures}
        if name != "plain":
            for f in figures:
                changes = [100 * (r[name][f] / r["plain"][f] - 1) for r in rounds]
                row[f"{f}_change_pct_median"] = statistics.median(changes)
                row[f"{f}_change_pct_min"] = min(changes)
                row[f"{f}_change_pct_max"] = max(changes)
        summary[name] = row
    return summary


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "rollouts.json")
    args = parser.parse_args()
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "digits"
        for version in ("1", "2"):
            build_digits(base / version / "model.onnx")
        (base / "inferd.toml").write_text(SETTINGS["plain"])
        server = launch(
            base.parent,
            f"--model_base_path={base}",
            "--model_name=digits",
            "--log_level=warning",
            poll_s=POLL_S,
            prefix=("taskset", "-c", SERVER_CPU),
        )
        try:
            server.wait_available("digits")
            server.wait_for(lambda: server.status("digits").get("2") == "AVAILABLE", "version 2")
            body = Path(tmp) / "body.json"
            body.write_text(json.dumps({"instances": [[0.0] * 64]}))
            wrk(server.url, body, 2, 16)  # warm-up
            half_rate = round(measure(server.url, body, args.duration, 1000)["throughput_rps"] / 2)
            print(f"plain: {2 * half_rate} req/s; half load {half_rate} req/s", flush=True)
            names = list(SETTINGS)
            for i in range(args.rounds):
                results: dict[str, dict[str, float]] = {}
                for name in names if i % 2 == 0 else names[::-1]:
                    switch(server, base, name)
                    results[name] = measure(server.url, body, args.duration, half_rate)
                    print(f"round {i + 1} {name} {results[name]}", flush=True)
                rounds.append(results)
        finally:
            server.stop()
    summary = summarize(rounds)
    for name, row in summary.items():
        print(name, {k: round(v, 2) for k, v in row.items()})
    report = {
        "duration_s": args.duration,
        "pinned": {"server": SERVER_CPU, "load_generator": CLIENT_CPU},
        "half_load_rate_rps": half_rate,
        "rounds": rounds,
        "summary": summary,
    }
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
