"""What the metrics, the prediction cache and a feature join add to a request's CPU, in process.

    taskset -c 0 .venv/bin/python -m bench.options_cost [--requests 20000] [--rounds 5]

Drives inferd's REST application in memory (as ``bench.request_cost`` does: no sockets, no HTTP
server), TF Serving JSON, one instance a request, at 1 and at 64 requests in flight, and prints
the CPU per request (``time.process_time``), the fastest of ``--rounds`` runs, for models that
differ in one option:

- digits without and with ``prediction_cache_size = 10000``: every request new (20,000 distinct
  inputs in turn, so each one misses and is stored: the cache's cost), and one input repeated
  (each one a hit);
- a three-column model (y = x . w) with all columns in the request, and the same model with two
  of them joined from an embedded CSV store (1,000 entities) with the entity cache on (60 s) and
  off (a lookup in the store's table every request).

Metrics are always recorded (``--enable_metrics`` only decides whether ``/metrics`` is served), so
their cost is the recording work timed alone (``bench.metrics_cost.per_request_s``). Each cost is
measured directly rather than by A/B runs of two servers over sockets, which on a 2-CPU machine
cannot resolve a few microseconds. Results go to stdout and bench/results/options-cost.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import uvloop

from bench import models
from bench.features import RESTAURANTS, TOML, features, write_model
from bench.metrics_cost import per_request_s
from bench.request_cost import CONCURRENCY, App, Request, cpu_per_request, one
from inferd.config import ServerConfig
from inferd.server import Server

RESULTS = Path(__file__).parent / "results" / "options-cost.json"
DISTINCT = 20_000


def _requests(app: App, path: str, bodies: list[bytes]) -> Request:
    """Requests posting ``bodies`` in turn, each expected to answer 200."""
    turn = itertools.cycle(bodies)

    async def request() -> bool:
        return await one(app, path, next(turn)) == 200

    return request


def _repository(work: Path) -> Path:
    repo = work / "models"
    models.build_digits(models.model_path(repo, "digits"))
    shutil.copytree(repo / "digits", repo / "digits_cached")
    (repo / "digits_cached" / "inferd.toml").write_text("prediction_cache_size = 10000\n")
    store = work / "restaurants.csv"
    lines = ["restaurant_id,incoming_orders_1h,outstanding_orders_per_min_1h"]
    lines += [f"r{i},{features(i)[0]},{features(i)[1]}" for i in range(RESTAURANTS)]
    store.write_text("\n".join(lines) + "\n")
    for name, ttl in (("eta_inline", None), ("eta_joined", 60), ("eta_joined_uncached", 0)):
        write_model(repo / name / "1")
        if ttl is not None:
            (repo / name / "inferd.toml").write_text(TOML.format(url=store, ttl=ttl))
    return repo


def _bodies(work: Path) -> dict[str, list[bytes]]:
    rng = np.random.default_rng(0)
    digits = models.instances("digits", 1)
    distinct = rng.random((DISTINCT, *digits.shape[1:]), dtype=np.float32)
    rows = [(f"r{(i * 37) % RESTAURANTS}", 0.5 + i % 9) for i in range(RESTAURANTS)]
    return {
        "digits": [orjson.dumps({"instances": digits.tolist()})],
        "distinct": [orjson.dumps({"instances": [row.tolist()]}) for row in distinct],
        "inline": [orjson.dumps({"instances": [[d, *features(int(r[1:]))]]}) for r, d in rows],
        "joined": [orjson.dumps({"instances": [{"restaurant_id": r, "distance_km": d}]}) for r, d in rows],
    }


CASES = (
    # (name, model, bodies)
    ("digits, no prediction cache, distinct inputs", "digits", "distinct"),
    ("digits, prediction cache, every request a miss", "digits_cached", "distinct"),
    ("digits, prediction cache, every request a hit", "digits_cached", "digits"),
    ("eta, all columns in the request", "eta_inline", "inline"),
    ("eta, two columns joined, entity cache on", "eta_joined", "joined"),
    ("eta, two columns joined, entity cache off", "eta_joined_uncached", "joined"),
)


async def measure(requests: int, rounds: int) -> list[dict[str, object]]:
    work = Path(tempfile.mkdtemp(prefix="inferd-options-cost-"))
    repo = _repository(work)
    bodies = _bodies(work)
    config = ServerConfig(repository=str(repo), rest_api_port=0, port=0, file_system_poll_wait_seconds=0)
    server = Server(config)
    await server.control.sync()
    app = server.http_app()
    metrics_s = min(per_request_s() for _ in range(rounds))
    print(
        f"{'metrics: the recording work, timed alone':56s} {metrics_s * 1e6:7.1f} us CPU per request",
        flush=True,
    )
    rows: list[dict[str, object]] = [
        {"case": "metrics recording, timed alone", "cpu_us_per_request": metrics_s * 1e6}
    ]
    for name, model, body in CASES:
        request = _requests(app, f"/v1/models/{model}:predict", bodies[body])
        if not await request():
            raise SystemExit(f"{name}: not answered")
        for concurrency in CONCURRENCY:
            await cpu_per_request(request, max(requests // 10, concurrency), concurrency)  # warm up
            best = min([await cpu_per_request(request, requests, concurrency) for _ in range(rounds)])
            rows.append({"case": name, "concurrency": concurrency, "cpu_us_per_request": best * 1e6})
            print(f"{name:50s} c={concurrency:<3d} {best * 1e6:7.1f} us CPU per request", flush=True)
    await server.close()
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per run (default 20,000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per case; the fastest counts (default 5)")
    args = parser.parse_args()
    rows = uvloop.run(measure(args.requests, args.rounds))
    document = {
        "command": " ".join(["python -m bench.options_cost", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
