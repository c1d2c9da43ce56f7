"""What the metrics, the prediction cache and a feature join add to a request's CPU, in process.

    taskset -c 0 .venv/bin/python -m bench.options_cost [--requests 20000] [--rounds 5]

Drives inferd's REST application in memory (``bench.request_cost``'s harness: no sockets, no HTTP
server), TF Serving JSON, one instance a request, from 1 and from 64 tasks, and prints the CPU
per request (``time.process_time``), the fastest of ``--rounds`` runs, for models that differ in
one option:

- digits without a prediction cache, with ``prediction_cache_size = 10000`` and with a cache of
  one entry (which keeps nothing for long): every request new (20,000 distinct inputs in turn,
  so each one misses and is stored), and one input repeated (with the cache, each one a hit);
- a three-column model (y = x . w) with all columns in the request, and the same model with two
  of them joined from an embedded CSV store (1,000 entities) with the entity cache on (60 s) and
  off (a lookup in the store's table every request).

Beside them, two pieces timed alone in a tight loop (wall clock, one thread): the metrics'
recording work (``bench.metrics_cost.per_request_s``; metrics are always recorded, and
``--enable_metrics`` only decides whether ``/metrics`` is served), and the prediction cache's own
code for a miss (key, lookup, and a store that evicts the oldest of 10,000 entries). Then the
cache's code, and the feature join (entity cache on), timed inside requests served one at a
time (the fastest of ``--rounds`` runs, each after a warm-up), where they run with processor
caches the rest of the request has filled (a tight loop alone flatters them). Each cost is
measured directly rather than by A/B runs of two servers over sockets, which on a 2-CPU machine
cannot resolve a few microseconds. Results go to stdout and bench/results/options-cost.json.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop

from bench import models
from bench.features import RESTAURANTS, TOML, features, instances, write_model
from bench.metrics_cost import per_request_s
from bench.request_cost import CONCURRENCY, App, Request, fastest, one
from inferd.config import ServerConfig
from inferd.features import FeatureJoin, PredictionCache
from inferd.server import Server

RESULTS = Path(__file__).parent / "results" / "options-cost.json"
DISTINCT = 20_000
CACHE_SIZE = 10_000

CASES = (
    # (name, model, bodies)
    ("digits, no prediction cache, a new input every request", "digits", "distinct"),
    ("digits, prediction cache, every request a miss", "digits_cached", "distinct"),
    ("digits, one-entry prediction cache, every request a miss", "digits_cache1", "distinct"),
    ("digits, no prediction cache, one input repeated", "digits", "repeated"),
    ("digits, prediction cache, every request a hit", "digits_cached", "repeated"),
    ("eta, all columns in the request", "eta_inline", "inline"),
    ("eta, two columns joined, entity cache on", "eta_joined", "joined"),
    ("eta, two columns joined, entity cache off", "eta_joined_uncached", "joined"),
)


def _requests(app: App, path: str, bodies: list[bytes]) -> Request:
    """Requests posting ``bodies`` in turn, each expected to answer 200."""
    turn = itertools.cycle(bodies)

    async def request() -> bool:
        return await one(app, path, next(turn)) == 200

    return request


def _repository(work: Path) -> Path:
    repo = work / "models"
    models.build_digits(models.model_path(repo, "digits"))
    for name, size in (("digits_cached", CACHE_SIZE), ("digits_cache1", 1)):
        shutil.copytree(repo / "digits", repo / name)
        (repo / name / "inferd.toml").write_text(f"prediction_cache_size = {size}\n")
    store = work / "restaurants.csv"
    lines = ["restaurant_id,incoming_orders_1h,outstanding_orders_per_min_1h"]
    lines += [f"r{i},{features(i)[0]},{features(i)[1]}" for i in range(RESTAURANTS)]
    store.write_text("\n".join(lines) + "\n")
    for name, ttl in (("eta_inline", None), ("eta_joined", 60), ("eta_joined_uncached", 0)):
        write_model(repo / name / "1")
        if ttl is not None:
            (repo / name / "inferd.toml").write_text(TOML.format(url=store, ttl=ttl))
    return repo


def _inputs() -> np.ndarray:
    """``DISTINCT`` digits inputs, one row each."""
    shape = models.instances("digits", 1).shape[1:]
    return np.random.default_rng(0).random((DISTINCT, *shape), dtype=np.float32)


def _bodies() -> dict[str, list[bytes]]:
    distinct = [orjson.dumps({"instances": [row.tolist()]}) for row in _inputs()]
    rows = instances(RESTAURANTS)
    return {
        "distinct": distinct,
        "repeated": distinct[:1],
        "inline": [orjson.dumps({"instances": [row]}) for row in rows["inline"]],
        "joined": [orjson.dumps({"instances": [row]}) for row in rows["joined"]],
    }


def cache_miss_s(calls: int = 100_000) -> float:
    """Seconds of the prediction cache's own work for one miss, timed alone: the key, the lookup
    and the store, which evicts the oldest entry once the cache is full."""
    cache = PredictionCache(CACHE_SIZE)
    inputs = itertools.cycle([{"input": row[None]} for row in _inputs()])
    outputs = {"probabilities": np.zeros((1, 10), np.float32)}

    def miss() -> None:
        key = cache.key("serving_default", next(inputs))
        cache.get(key)
        cache.put(key, dict(outputs))

    for _ in range(DISTINCT):  # full, and every input seen once
        miss()
    started = time.perf_counter()
    for _ in range(calls):
        miss()
    return (time.perf_counter() - started) / calls


async def in_requests_s(request: Request, requests: int, methods: tuple[tuple[type, str], ...]) -> float:
    """Seconds per request spent in ``methods`` (class, name), timed inside served requests:
    each call between two ``perf_counter`` reads, less the reads' own cost (timed alone). Unlike
    a tight loop, this pays what the rest of a request costs the processor's caches. A coroutine
    method is timed until it returns, waits included."""
    spent = 0.0
    calls = 0

    def timed(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            nonlocal spent, calls
            started = time.perf_counter()
            try:
                return original(*args)
            finally:
                spent += time.perf_counter() - started
                calls += 1

        async def call_async(*args: Any) -> Any:
            nonlocal spent, calls
            started = time.perf_counter()
            try:
                return await original(*args)
            finally:
                spent += time.perf_counter() - started
                calls += 1

        return call_async if inspect.iscoroutinefunction(original) else call

    originals = [(owner, name, getattr(owner, name)) for owner, name in methods]
    for owner, name, original in originals:
        setattr(owner, name, timed(original))
    try:
        for _ in range(requests):
            if not await request():
                raise SystemExit(f"timing {methods}: a request was not answered")
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    started = time.perf_counter()
    for _ in range(calls):  # a timed call holds about one read: the end of one, the start of the next
        time.perf_counter()
    reads_s = time.perf_counter() - started
    return (spent - reads_s) / requests


async def measure(requests: int, rounds: int) -> list[dict[str, object]]:
    work = Path(tempfile.mkdtemp(prefix="inferd-options-cost-"))
    repo = _repository(work)
    bodies = _bodies()
    config = ServerConfig(repository=str(repo), rest_api_port=0, port=0, file_system_poll_wait_seconds=0)
    server = Server(config)
    await server.control.sync()
    app = server.http_app()
    rows: list[dict[str, object]] = []
    for label, timed in (
        ("metrics: the recording work, timed alone", per_request_s),
        ("prediction cache: a miss's key, lookup and store, timed alone", cache_miss_s),
    ):
        seconds = min(timed() for _ in range(rounds))
        rows.append({"case": label, "us_per_request": seconds * 1e6})
        print(f"{label:82s} {seconds * 1e6:7.1f} us per request", flush=True)
    cache = ((PredictionCache, "key"), (PredictionCache, "get"), (PredictionCache, "put"))
    for label, model, body, warm_up, methods in (
        (
            "prediction cache: a miss's key, lookup and store, timed inside served requests",
            "digits_cached",
            "distinct",
            DISTINCT,  # full, and every input seen once: each request then misses
            cache,
        ),
        (
            "feature join, entity cache on: FeatureJoin.join timed inside served requests",
            "eta_joined",
            "joined",
            RESTAURANTS,  # every entity cached
            ((FeatureJoin, "join"),),
        ),
    ):
        request = _requests(app, f"/v1/models/{model}:predict", bodies[body])
        runs = []
        for _ in range(rounds):
            for _ in range(warm_up):
                await request()
            runs.append(await in_requests_s(request, requests, methods))
        seconds = min(runs)
        rows.append({"case": label, "concurrency": 1, "us_per_request": seconds * 1e6})
        print(f"{label:82s} {seconds * 1e6:7.1f} us per request", flush=True)
    for name, model, body in CASES:
        request = _requests(app, f"/v1/models/{model}:predict", bodies[body])
        if not await request():
            raise SystemExit(f"{name}: not answered")
        for concurrency in CONCURRENCY:
            best = await fastest(request, requests, rounds, concurrency)
            rows.append({"case": name, "concurrency": concurrency, "cpu_us_per_request": best * 1e6})
            print(f"{name:74s} c={concurrency:<3d} {best * 1e6:7.1f} us CPU per request", flush=True)
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
