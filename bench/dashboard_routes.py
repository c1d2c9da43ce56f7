#!/usr/bin/env python
"""What one reading of each dashboard data route costs, over HTTP, on a server with three models of
two versions each and a rollout running (so that the models route also computes the guard
metrics of the rollout's current step).

    PYTHONPATH=src:. .venv/bin/python bench/dashboard_routes.py [--readings 200] [--rounds 3]

Prints, per round and route, the median and fastest client-measured time of one reading.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import requests

from tests.conftest import launch
from tests.models import write_onnx_digits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("a", "b", "c"):
            for version in (1, 2):
                write_onnx_digits(root / "repo" / name / str(version))
            (root / "repo" / name / "inferd.toml").write_text(
                "version_policy = { all = true }\n[labels]\nstable = 1\n"
            )
        server = launch(root, str(root / "repo"), "--admin_token=t")
        try:
            server.wait_for(lambda: all(len(server.status(n)) == 2 for n in "abc"), "the models")
            requests.post(
                f"{server.url}/v2/repository/models/a/rollout",
                json={"to": 2, "steps": [50, 100], "step_s": 600, "guards": ["error_rate<=0.01"]},
                headers={"authorization": "Bearer t"},
                timeout=10,
            ).raise_for_status()
            with requests.Session() as session:
                for round_ in range(args.rounds):
                    for route in ("/dashboard/api/models", "/dashboard/api/metrics"):
                        times = []
                        for _ in range(args.readings):
                            started = time.perf_counter()
                            session.get(server.url + route, timeout=5).raise_for_status()
                            times.append(time.perf_counter() - started)
                        median_ms, best_ms = statistics.median(times) * 1e3, min(times) * 1e3
                        print(f"round {round_}: {route}: median {median_ms:.2f} ms, fastest {best_ms:.2f} ms")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
