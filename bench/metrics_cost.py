#!/usr/bin/env python
"""What inferd's metrics cost per request, in process, as a share of a request's server CPU time.

    .venv/bin/python -m bench.metrics_cost [bench/results/latest.json]

Times the work that a served request does for the metrics and that ``--enable_metrics=false``
skips: what a request's ``InferenceService.call`` records when it ends (the request counter and
the seven stage histograms), the in-flight gauge's two updates and the batch-size observation. It
divides that by the CPU-seconds per request
that the benchmark measured for inferd (digits, one instance, 64 connections). With the noise of
a shared 2-CPU machine, an A/B of two servers cannot resolve a difference of a few percent; this
measures the cost directly.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from inferd.manager import ModelManager
from inferd.metrics import Metrics
from inferd.servable import Servable, ServableFactory
from inferd.service import InferenceService
from inferd.threads import ThreadPool
from inferd.types import InferenceResponse, ModelId

BENCH = Path(__file__).resolve().parent


def per_request_s(calls: int = 200_000) -> float:
    metrics = Metrics()
    batch_sizes = metrics.batch_size("digits", "1")
    response = InferenceResponse(ModelId("digits", 1), {"y": np.zeros(1)}, None, 1e-5, 2e-5)
    with ThreadPoolExecutor(1) as pool:
        factory = ServableFactory(ThreadPool(1, "inferd-infer"))
        manager: ModelManager[Servable] = ModelManager(pool, factory.load)
        service = InferenceService(manager, metrics)
        started = time.perf_counter()
        for _ in range(calls):
            with service.call("tfserving_rest", "digits", "r1") as call:
                call.decoded = time.perf_counter()
                call.response, call.resumed = response, time.perf_counter()
            batch_sizes.observe(1)
        return (time.perf_counter() - started) / calls


def main() -> int:
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH / "results" / "latest.json"
    rows = json.loads(results.read_text())["rows"]
    row = next(
        r
        for r in rows
        if r["server"] == "inferd"
        and r["variant"] == "default"
        and r["model"] == "digits"
        and r["instances"] == 1
        and r["connections"] == 64
    )
    cost_s = min(per_request_s() for _ in range(3))
    cpu_s = row["cpu_s_per_1k_pred"] / 1000
    print(f"metrics per request: {cost_s * 1e6:.2f} µs")
    print(
        f"server CPU per request (digits, 1 instance, 64 connections, {results.name}): {cpu_s * 1e6:.0f} µs"
    )
    print(f"share: {cost_s / cpu_s:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
