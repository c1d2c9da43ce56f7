#!/usr/bin/env python
"""What shadow traffic and traffic capture cost the requests they ride on.

    .venv/bin/python -m bench.rollouts [--duration 10] [--out bench/results/rollouts.json]

Serves the digits MLP (bench/models.py) as versions 1 and 2 of one model, requests routed to
version 1 by ``[traffic]``, three ways: plain, with ``[shadow] version = 2, fraction = 1.0``
(every request mirrored), and with ``[capture] fraction = 0.01``. For each it measures with
``inferd bench`` (TF Serving REST, one instance a request): the closed-loop throughput at 16
connections, and the p99 latency of an open loop at half the plain server's throughput (the
"half-loaded server"). Run it on an otherwise idle machine; a shared one makes a few percent noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.models import build_digits
from tests.inferd_process import ServerProcess, launch

BENCH = Path(__file__).resolve().parent


SETTINGS = {
    "plain": '[traffic]\n"1" = 1\n',
    "shadow_1.0": '[traffic]\n"1" = 1\n[shadow]\nversion = 2\nfraction = 1.0\n',
    "capture_1%": '[traffic]\n"1" = 1\n[capture]\npath = "captures"\nfraction = 0.01\n',
}


def serve(base: Path) -> ServerProcess:
    """``inferd serve`` for the digits model in ``base``, once a version is AVAILABLE."""
    server = launch(base.parent, f"--model_base_path={base}", "--model_name=digits", "--log_level=warning")
    try:
        server.wait_available("digits")
    except BaseException:
        server.stop()
        raise
    return server


def bench(url: str, pid: int, out: Path, duration: float, *step: str) -> dict[str, object]:
    argv = [sys.executable, "-m", "inferd", "bench", url, "--model=digits", f"--duration={duration}"]
    argv += ["--warmup=2", f"--server_pid={pid}", f"--json={out}", *step]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    report: dict[str, object] = json.loads(out.read_text())["steps"][0]
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "rollouts.json")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    half_rate = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "digits"
        for version in ("1", "2"):
            build_digits(base / version / "model.onnx")
        for name, settings in SETTINGS.items():
            (base / "inferd.toml").write_text(settings)
            server = serve(base)
            url = server.url
            try:
                closed = bench(url, server.pid, Path(tmp) / "closed.json", args.duration, "--concurrency=16")
                if not half_rate:
                    half_rate = round(float(closed["requests_per_s"]) / 2)  # type: ignore[arg-type]
                opened = bench(url, server.pid, Path(tmp) / "open.json", args.duration, f"--rate={half_rate}")
            finally:
                server.stop()
            p99 = opened["latency_ms"]["p99"]  # type: ignore[index]
            results[name] = {
                "throughput_rps": float(closed["requests_per_s"]),  # type: ignore[arg-type]
                "half_load_rate_rps": half_rate,
                "half_load_p99_ms": float(p99),
                "half_load_p50_ms": float(opened["latency_ms"]["p50"]),  # type: ignore[index]
            }
            print(name, results[name], flush=True)
    plain = results["plain"]
    summary = {
        "shadow_p99_change_pct": 100
        * (results["shadow_1.0"]["half_load_p99_ms"] / plain["half_load_p99_ms"] - 1),
        "capture_throughput_change_pct": 100
        * (results["capture_1%"]["throughput_rps"] / plain["throughput_rps"] - 1),
    }
    print(summary)
    args.out.write_text(
        json.dumps({"duration_s": args.duration, "runs": results, "summary": summary}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
