#!/usr/bin/env python
"""Many models, one memory budget: hit rates against LRU and Belady, cold starts, and the
resident models' latency while cold loads run. Opt-in (not CI).

    .venv/bin/python -m bench.multimodel --models 50 --duration 30
    .venv/bin/python -m bench.multimodel --models 500 --min-mb 0.1 --max-mb 5 --duration 30

``--models`` ONNX models (``y = table[i]``, one random FP32 initializer each) of log-uniform sizes
between ``--min-mb`` and ``--max-mb`` are built in a temporary folder. A trace of open-loop
Poisson arrivals at ``--rate`` per second for ``--duration`` seconds picks models by Zipf(``--zipf``)
popularity (ranks shuffled, so popularity and size are independent). The budget is a fifth of
the models' total bytes (``--fraction``), raised when needed to the largest model's load
reservation (3x its file, see inferd.residency.LOAD_FACTORS), and says so.

1. **Replay** (offline, the same trace): the byte budget as a cache of model files, with inferd's
   own policy (``GreedyDualSizeFrequency``, load cost = seconds per byte measured below), LRU, and
   Belady (evict the model used again farthest in the future; with unequal sizes a strong offline
   bound rather than a proven optimum): hit rate and byte hit rate.
2. **Live**, twice with the same trace (a thread per request, sent at its arrival time whatever
   the others do) plus one pinned probe model requested every 50 ms: first without a budget, every
   model loaded at start (no cold load; its RSS is what "load everything" takes; skip it with
   ``--no-reference``), then under ``--memory_budget``. Reported: the server's loads per request
   (its miss rate), cold-start p50/p99 (from ``inferd_cold_start_seconds``) against the models' own
   load-plus-warm-up time (from ``inferd_model_load_duration_seconds``), the probe's p99 in both
   runs (the same traffic with and without cold loads), and peak RSS (sampled every 100 ms)
   against the idle RSS plus the budget.
With ``--load-nice N`` every model but the probe gets ``[onnx] load_nice = N`` (its session is
built at a lower CPU priority), to compare the probe's p99 with and without. With
``--external-data`` every model's table is saved as ONNX external data and served from
onnxruntime's mapping of that file (``[onnx] share_weights = true``): a load then maps the file
instead of parsing and copying it, and a close unmaps it instead of freeing private memory. With
``--share-weights`` the weights stay inside ``model.onnx`` and are served with ``share_weights =
true``: inferd writes each model's mapped copy at its first load and maps it from then on. Each
server gets an empty model cache, so the run under the budget pays every first load's copy; with
``--reuse-cache`` it gets the cache of the run without a budget, whose loads at start wrote every
copy (a server restarted on the same repository and cache).

Results go to stdout and bench/results/multimodel-<N>.json (multimodel-<N>-external.json with
``--external-data``, multimodel-<N>-shared.json with ``--share-weights``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import requests
from onnx import TensorProto, helper, numpy_helper

from inferd.residency import LOAD_FACTORS, GreedyDualSizeFrequency
from inferd.usage import read_pid
from tests.inferd_process import ServerProcess, launch

BENCH = Path(__file__).resolve().parent


MB = 10**6


def write_table(folder: Path, nbytes: int, seed: int, external: bool = False) -> None:
    """``model.onnx``: ``y = table[i]`` over a random table of about ``nbytes``; with ``external``,
    the table is saved as ONNX external data in ``model.onnx.data`` beside it."""
    rows = max(nbytes // 64, 1)
    table = np.random.default_rng(seed).standard_normal((rows, 16), dtype=np.float32)
    i = helper.make_tensor_value_info("i", TensorProto.INT64, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])
    node = helper.make_node("Gather", ["table", "i"], ["y"], axis=0)
    graph = helper.make_graph([node], "table", [i], [y], [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx", save_as_external_data=external, location="model.onnx.data")


def zipf_trace(n: int, s: float, rate: float, duration: float, seed: int) -> list[tuple[float, int]]:
    """(arrival second, model index) of a Poisson process with Zipf(s) model popularity."""
    rng = random.Random(seed)
    ranks = list(range(n))
    rng.shuffle(ranks)
    weights = [1 / (r + 1) ** s for r in range(n)]
    models = [ranks[r] for r in range(n)]
    trace: list[tuple[float, int]] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return trace
        trace.append((t, rng.choices(models, weights)[0]))


def replay(
    trace: list[int], sizes: list[int], budget: int, policy: str, cost_per_byte: float
) -> dict[str, float]:
    """Hit rate and byte hit rate of one eviction policy on ``trace`` with a byte ``budget``."""
    resident: set[int] = set()
    used = hits = hit_bytes = all_bytes = 0
    gdsf: GreedyDualSizeFrequency[int] = GreedyDualSizeFrequency()
    lru: OrderedDict[int, None] = OrderedDict()
    next_use: list[float] = [math.inf] * len(trace)
    seen: dict[int, int] = {}
    for at in range(len(trace) - 1, -1, -1):
        next_use[at] = seen.get(trace[at], math.inf)
        seen[trace[at]] = at
    upcoming: dict[int, float] = {}
    for at, model in enumerate(trace):
        size = sizes[model]
        all_bytes += size
        upcoming[model] = next_use[at]
        if model in resident:
            hits += 1
            hit_bytes += size
            gdsf.hit(model)
            lru.move_to_end(model)
            continue
        while used + size > budget and resident:
            if policy == "gdsf":
                victim = gdsf.victims(resident, {m: sizes[m] for m in resident}, used + size - budget)[0]
            elif policy == "lru":
                victim = next(iter(lru))
            else:
                victim = max(resident, key=lambda m: upcoming[m])
            resident.discard(victim)
            gdsf.forget(victim)
            lru.pop(victim, None)
            used -= sizes[victim]
        resident.add(model)
        used += size
        gdsf.admit(model, size, 0.02 + size * cost_per_byte)
        lru[model] = None
    return {"hit_rate": hits / len(trace), "byte_hit_rate": hit_bytes / all_bytes}


def metrics(url: str) -> str:
    return requests.get(f"{url}/metrics", timeout=30).text


def samples(text: str, name: str) -> list[tuple[str, float]]:
    return [
        (m.group(1) or "", float(m.group(2)))
        for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)
    ]


def histogram_quantile(text: str, name: str, q: float) -> float:
    """The upper bound of the bucket holding quantile ``q``, over every label set of ``name``."""
    counts: dict[float, float] = {}
    for labels, value in samples(text, name + "_bucket"):
        le = re.search(r'le="([^"]+)"', labels)
        if le:
            counts[float(le.group(1))] = counts.get(float(le.group(1)), 0.0) + value
    total = counts.get(math.inf, 0.0)
    for bound in sorted(counts):
        if total and counts[bound] >= q * total:
            return bound
    return math.nan


def start(repo: Path, *flags: str, prefix: tuple[str, ...] = ()) -> ServerProcess:
    """``inferd serve`` on ``repo`` (no gRPC), once ``/v2/health/ready`` answers 200 (loading many
    models at start can take minutes); ``prefix`` goes before the command (``taskset``)."""
    server = launch(repo.parent, str(repo), *flags, wait=False, prefix=prefix)

    def ready() -> bool:
        try:
            return requests.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        server.wait_for(ready, "the server to be ready", timeout_s=600)
    except BaseException:
        server.stop()
        raise
    return server


def body(rows: list[int]) -> dict[str, Any]:
    return {"inputs": [{"name": "i", "datatype": "INT64", "shape": [len(rows)], "data": rows}]}


def probe_latencies(url: str, stop_at: float) -> list[float]:
    session, latencies = requests.Session(), []
    while time.monotonic() < stop_at:
        began = time.perf_counter()
        session.post(f"{url}/v2/models/probe/infer", json=body([1]), timeout=60)
        latencies.append(time.perf_counter() - began)
        time.sleep(0.05)
    return latencies


def live(server: ServerProcess, timed: list[tuple[float, int]], duration: float) -> dict[str, Any]:
    """Send ``timed`` (a thread per request, at its arrival time whatever the others do) while
    the probe model is requested every 50 ms and the server's RSS is sampled every 100 ms."""
    url = server.url
    idle_rss = read_pid(server.pid)[1]
    rss: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss.append(read_pid(server.pid)[1])
            done.wait(0.1)

    statuses: dict[int, int] = {}
    lock = threading.Lock()
    local = threading.local()

    def send(model: int) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        response = session.post(f"{url}/v2/models/m{model:03d}/infer", json=body([0]), timeout=120)
        with lock:
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.monotonic()
    probe: list[float] = []
    prober = threading.Thread(target=lambda: probe.extend(probe_latencies(url, began + duration)))
    prober.start()
    with ThreadPoolExecutor(64) as pool:
        for at, model in timed:
            delay = began + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, model)
    prober.join()
    done.set()
    sampler.join()
    return {
        "statuses": statuses,
        "probe_p99_ms": 1000 * float(np.percentile(probe, 99)),
        "probe_max_ms": 1000 * max(probe),
        "idle_rss": idle_rss,
        "peak_rss": max(rss),
        "metrics": metrics(url),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--min-mb", type=float, default=1.0)
    parser.add_argument("--max-mb", type=float, default=50.0)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--pin", action="store_true", help="the server on CPU 0, this load generator on CPU 1 (taskset)"
    )
    parser.add_argument("--load-nice", type=int, default=0, help="[onnx] load_nice of the models (0: none)")
    parser.add_argument(
        "--external-data",
        action="store_true",
        help="save the models' weights as external data, served mapped ([onnx] share_weights)",
    )
    parser.add_argument(
        "--share-weights",
        action="store_true",
        help="weights inside model.onnx, served with [onnx] share_weights (inferd maps a copy)",
    )
    parser.add_argument(
        "--reuse-cache", action="store_true", help="the run under the budget reuses the reference run's cache"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the run without a budget")
    parser.add_argument(
        "--replay-requests", type=int, default=20_000, help="length of the (longer) trace the policies replay"
    )
    parser.add_argument("--replay-only", action="store_true", help="replay the policies; start no server")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    lo, hi = math.log(args.min_mb * MB), math.log(args.max_mb * MB)
    sizes = [int(math.exp(rng.uniform(lo, hi))) for _ in range(args.models)]
    work = Path(tempfile.mkdtemp(prefix="inferd-multimodel-"))
    repo = work / "repo"
    on_disk = sizes  # the table's bytes; the file adds ~200 bytes
    if not args.replay_only:
        onnx_table = "".join(
            (
                f"load_nice = {args.load_nice}\n" if args.load_nice else "",
                "share_weights = true\n" if args.external_data or args.share_weights else "",
            )
        )
        for n, size in enumerate(sizes):
            write_table(repo / f"m{n:03d}" / "1", size, n, args.external_data)
            if onnx_table:
                (repo / f"m{n:03d}" / "inferd.toml").write_text(f"[onnx]\n{onnx_table}")
        write_table(repo / "probe" / "1", 64_000, 99999)
        (repo / "probe" / "inferd.toml").write_text("[residency]\npin = true\n")
        on_disk = [
            sum(f.stat().st_size for f in (repo / f"m{n:03d}" / "1").iterdir()) for n in range(args.models)
        ]
    total = sum(on_disk)
    budget = int(max(total * args.fraction, 1.1 * LOAD_FACTORS["onnx"] * max(on_disk)))
    timed = zipf_trace(args.models, args.zipf, args.rate, args.duration, args.seed)
    trace = [model for _, model in timed]
    long_trace = [m for _, m in zipf_trace(args.models, args.zipf, 1.0, args.replay_requests, args.seed)]
    if args.replay_only:  # load cost: 20 ms + 10 ms per MB (onnxruntime on this machine, roughly)
        replayed = {p: replay(long_trace, on_disk, budget, p, 1e-8) for p in ("gdsf", "lru", "belady")}
        print(json.dumps({"models": args.models, "requests": len(long_trace), "replay": replayed}, indent=2))
        shutil.rmtree(work, ignore_errors=True)
        return
    print(
        f"{args.models} models, {total / MB:.0f} MB on disk, budget {budget / MB:.0f} MB "
        f"({budget / total:.0%} of it), {len(trace)} requests over {args.duration:g} s"
    )

    prefix = ("taskset", "-c", "0") if args.pin else ()
    if args.pin:
        os.sched_setaffinity(0, {1})
    reference: dict[str, Any] = {}
    if not args.no_reference:  # the same traffic with every model loaded at start: no cold load
        server = start(repo, f"--model_cache_dir={work / 'cache-reference'}", prefix=prefix)
        try:
            reference = live(server, timed, args.duration)
        finally:
            server.stop()
    cache = work / ("cache-reference" if args.reuse_cache else "cache")
    server = start(repo, f"--memory_budget={budget}", f"--model_cache_dir={cache}", prefix=prefix)
    try:
        run = live(server, timed, args.duration)
    finally:
        server.stop()
    text = run["metrics"]
    loads = {labels: v for labels, v in samples(text, "inferd_model_loads_total")}
    cold_loads = sum(v for labels, v in loads.items() if "start" not in labels)
    load_sum = sum(v for _, v in samples(text, "inferd_model_load_duration_seconds_sum"))
    load_count = sum(v for _, v in samples(text, "inferd_model_load_duration_seconds_count"))
    seconds_per_byte = (load_sum / load_count) / (sum(on_disk) / len(on_disk)) if load_count else 1e-8
    result: dict[str, Any] = {
        "models": args.models,
        "size_mb": [args.min_mb, args.max_mb],
        "total_mb": total / MB,
        "budget_mb": budget / MB,
        "requests": len(trace),
        "rate": args.rate,
        "duration_s": args.duration,
        "load_nice": args.load_nice,
        "external_data": args.external_data,
        "share_weights": args.share_weights,
        "reuse_cache": args.reuse_cache,
        "pinned": args.pin,
        "replay_requests": len(long_trace),
        "replay": {
            policy: replay(long_trace, on_disk, budget, policy, seconds_per_byte)
            for policy in ("gdsf", "lru", "belady")
        },
        "live": {
            "statuses": run["statuses"],
            "miss_rate": cold_loads / len(trace),
            "evictions": dict(samples(text, "inferd_model_evictions_total")),
            "cold_start_p50_s": histogram_quantile(text, "inferd_cold_start_seconds", 0.5),
            "cold_start_p99_s": histogram_quantile(text, "inferd_cold_start_seconds", 0.99),
            "load_p50_s": histogram_quantile(text, "inferd_model_load_duration_seconds", 0.5),
            "load_p99_s": histogram_quantile(text, "inferd_model_load_duration_seconds", 0.99),
            "load_mean_s": load_sum / load_count if load_count else math.nan,
            "probe_p99_ms": run["probe_p99_ms"],
            "probe_max_ms": run["probe_max_ms"],
            "idle_rss_mb": run["idle_rss"] / MB,
            "peak_rss_mb": run["peak_rss"] / MB,
            "peak_over_idle_mb": (run["peak_rss"] - run["idle_rss"]) / MB,
        },
    }
    if reference:
        result["no_budget"] = {
            "statuses": reference["statuses"],
            "probe_p99_ms": reference["probe_p99_ms"],
            "probe_max_ms": reference["probe_max_ms"],
            "rss_mb": reference["peak_rss"] / MB,
        }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    suffix = "-external" if args.external_data else "-shared" if args.share_weights else ""
    suffix += "-reused" if args.reuse_cache else ""
    out = BENCH / "results" / f"multimodel-{args.models}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
