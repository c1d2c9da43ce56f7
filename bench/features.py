#!/usr/bin/env python
"""Feature lookups: the cost of joining features from Redis on loopback into each request,
against the same model answering the same rows with every feature inline.

    .venv/bin/python -m bench.features                 # 2 rounds, 1 s warm-up + 5 s per row
    .venv/bin/python -m bench.features --duration 10 --repeats 3

One inferd process serves three copies of a tiny ONNX model (y = x . w on x FP32 [-1, 3]):
``inline`` (the request carries all three columns), ``redis`` (the request carries restaurant_id
and distance_km; two features come from Redis on every request: cache TTL 0, so one round trip
per request) and ``cached`` (the same with the entity cache on, TTL 60 s). wrk drives 1 and 64
connections with 1 and 32 instances per request (32 distinct restaurants), the three variants
in turn in each repeat; rows give medians over repeats. Prints a Markdown table for
docs/benchmarks.md and writes bench/results/features.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, save

from bench import procs
from bench.run import WORK, log, post, run_wrk
from tests.inferd_process import free_port
from tests.redis_server import RedisServer

BENCH = Path(__file__).resolve().parent


RESTAURANTS = 1000
TOML = """\
[features]
store = "{url}"
entity = "restaurant_id"
prefix = "restaurant"
fetch = ["incoming_orders_1h", "outstanding_orders_per_min_1h"]
lookup_timeout_ms = 1000
cache_ttl_s = {ttl}
[features.inputs]
x = ["distance_km", "incoming_orders_1h", "outstanding_orders_per_min_1h"]
"""


def write_model(folder: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 1], [3.2, 0.08, 14.0])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "eta", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    save(model, folder / "model.onnx")


def features(i: int) -> tuple[float, float]:
    return float(i % 60), round((i % 17) / 10, 2)


def instances(n: int) -> dict[str, list[Any]]:
    """``n`` rows (restaurant, distance) as the ``inline`` model takes them (all three columns) and
    as the ``joined`` ones do (the restaurant's id and the distance)."""
    rows = [(f"r{(i * 37) % RESTAURANTS}", 0.5 + i % 9) for i in range(n)]
    return {
        "inline": [[d, *features(int(r[1:]))] for r, d in rows],
        "joined": [{"restaurant_id": r, "distance_km": d} for r, d in rows],
    }


def bodies(n: int, work: Path) -> dict[str, Path]:
    out = {}
    for name, rows in instances(n).items():
        path = out[name] = work / f"{name}-{n}.json"
        path.write_text(json.dumps({"instances": rows}))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = WORK / "features"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    wrk = shutil.which("wrk") or sys.exit("wrk is not installed: apt-get install -y wrk")
    http_port = free_port()
    store = RedisServer(work)
    store.start()
    url = store.url
    server = None
    try:
        client = store.client()
        pipe = client.pipeline(transaction=False)
        for i in range(RESTAURANTS):
            incoming, outstanding = features(i)
            pipe.hset(
                f"restaurant:r{i}",
                mapping={"incoming_orders_1h": incoming, "outstanding_orders_per_min_1h": outstanding},
            )
        pipe.execute()
        repo = work / "models"
        for name, toml in (
            ("inline", ""),
            ("redis", TOML.format(url=url, ttl=0)),
            ("cached", TOML.format(url=url, ttl=60)),
        ):
            write_model(repo / name / "1")
            (repo / name / "inferd.toml").write_text(toml)
        argv = [
            sys.executable,
            "-m",
            "inferd",
            "serve",
            str(repo),
            f"--rest_api_port={http_port}",
            "--host=127.0.0.1",
            "--port=0",
        ]
        server = procs.ServerProcess(argv, work, dict(os.environ), work / "inferd.log")
        base = f"http://127.0.0.1:{http_port}/v1/models"
        files = {n: bodies(n, work) for n in (1, 32)}
        deadline = time.monotonic() + 60
        while True:
            try:
                answers = {
                    m: post(
                        f"{base}/{m}:predict", files[32]["inline" if m == "inline" else "joined"].read_bytes()
                    )
                    for m in ("inline", "redis", "cached")
                }
                if all(status == 200 for status, _ in answers.values()):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or not server.alive():
                sys.exit(f"inferd did not answer:\n{server.log_tail()}")
            time.sleep(0.5)
        got = {m: np.array(json.loads(body)["predictions"]) for m, (_, body) in answers.items()}
        for model in ("redis", "cached"):
            if not np.allclose(got["inline"], got[model]):
                sys.exit(f"{model} answers differ from inline: {got}")
        rows = []
        models = ("inline", "redis", "cached")
        for n in (1, 32):
            for connections in (1, 64):
                runs: dict[str, list[dict[str, Any]]] = {model: [] for model in models}
                for _ in range(args.repeats):  # the variants in turn, so that noise hits them alike
                    for model in models:
                        body = files[n]["inline" if model == "inline" else "joined"]
                        run_wrk(wrk, f"{base}/{model}:predict", body, connections, args.warmup)
                        runs[model].append(
                            run_wrk(wrk, f"{base}/{model}:predict", body, connections, args.duration)
                        )
                for model in models:
                    row = {
                        "model": model,
                        "instances": n,
                        "connections": connections,
                        "rps": statistics.median(
                            r["requests"] / (r["duration_us"] / 1e6) for r in runs[model]
                        ),
                        "p50_ms": statistics.median(r["p50_us"] for r in runs[model]) / 1000,
                        "p99_ms": statistics.median(r["p99_us"] for r in runs[model]) / 1000,
                        "errors": sum(r["non2xx"] + r["timeouts"] + r["read_errors"] for r in runs[model]),
                    }
                    rows.append(row)
                    log(json.dumps(row))
        round_trips = client.info("commandstats").get("cmdstat_eval", {}).get("calls", 0)
        joins = in_process(url, files)
    finally:
        if server is not None:
            server.stop()
        store.kill()
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "argv": sys.argv[1:],
        "eval_calls": round_trips,
        "in_process_join_us": joins,
    }
    (BENCH / "results" / "features.json").write_text(json.dumps({"run": meta, "rows": rows}, indent=1) + "\n")
    print(report(rows, round_trips))
    print("\nFeatureJoin.join in process, microseconds per request (median of 5 x 1,000):")
    for name, micros in joins.items():
        print(f"- {name}: {micros:.0f} us")
    return 0


def in_process(url: str, files: dict[int, dict[str, Path]]) -> dict[str, float]:
    """The join alone (no HTTP, no model): per request, with the entity cache on and off."""
    import uvloop

    from inferd.config import read_model_settings
    from inferd.features import FeatureJoin, FeatureStores, plan_join
    from inferd.metrics import FeatureStats
    from inferd.types import Signature, TensorSpec

    signature = Signature(
        "serving_default",
        (TensorSpec("x", np.dtype(np.float32), (-1, 3)),),
        (TensorSpec("y", np.dtype(np.float32), (-1, 1)),),
    )
    results: dict[str, float] = {}

    async def measure() -> None:
        stores = FeatureStores()
        for ttl in (60, 0):
            folder = WORK / "features" / f"join-{ttl}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "inferd.toml").write_text(TOML.format(url=url, ttl=ttl))
            settings = read_model_settings(folder).features
            assert settings is not None
            plans = plan_join(settings, {"serving_default": signature})
            join = FeatureJoin("bench", settings, plans, stores.open(settings), FeatureStats())
            for n, bodies_n in files.items():
                rows = json.loads(bodies_n["joined"].read_text())["instances"]
                inputs = {
                    "restaurant_id": np.array([r["restaurant_id"] for r in rows], dtype=object),
                    "distance_km": np.array([r["distance_km"] for r in rows], dtype=np.float32),
                }
                samples = []
                for _ in range(6):
                    started = time.perf_counter()
                    for _ in range(1000):
                        await join.join("serving_default", inputs, None)
                    samples.append((time.perf_counter() - started) * 1000)
                cache = "cache on" if ttl else "cache off (one Redis round trip)"
                results[f"{n} instance(s), {cache}"] = statistics.median(samples[1:])
        await stores.close()

    uvloop.run(measure())
    return results


def report(rows: list[dict[str, Any]], round_trips: int) -> str:
    inline = {(r["instances"], r["connections"]): r for r in rows if r["model"] == "inline"}
    lines = [
        "| model | instances | connections | requests/s | vs inline | p50 ms | added p50 ms | p99 ms "
        "| errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        base = inline[(r["instances"], r["connections"])]
        lines.append(
            f"| {r['model']} | {r['instances']} | {r['connections']} | {r['rps']:,.0f} | "
            f"{r['rps'] / base['rps']:.0%} | {r['p50_ms']:.3f} | {r['p50_ms'] - base['p50_ms']:+.3f} | "
            f"{r['p99_ms']:.3f} | {r['errors']} |"
        )
    lines.append(f"\nRedis EVAL calls (one per uncached request): {round_trips:,}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
