#!/usr/bin/env python
"""What the dashboard and OpenTelemetry tracing cost, measured two ways.

    .venv/bin/python -m bench.dashboard_cost [--duration 8] [--repeats 2]

1. In process (robust on a shared machine): the seconds one ``/dashboard/api/metrics`` reading
   takes (an open page reads it once a second), and the seconds ``Tracing.record`` adds to a
   request at sample rate 0 and 1 (exporting over gRPC to a receiver in this process that
   discards what it gets).
2. End to end: ``inferd serve`` on the digits classifier (ONNX) driven by ``inferd bench`` (REST,
   1 instance, concurrency 16) with the dashboard closed or open (a poller reading the metrics
   route every second and the models route every two, as the page does), and with tracing off,
   at rate 0 and at rate 1.0 (to the discarding receiver). Each setting runs
   ``--repeats`` times, interleaved; the table gives each run's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from inferd.control import ModelControl
from inferd.dashboard import Dashboard
from inferd.manager import ModelManager
from inferd.metrics import Metrics
from inferd.servable import Servable, ServableFactory
from inferd.service import InferenceService
from inferd.threads import ThreadPool
from inferd.tracing import Tracing
from inferd.types import InferenceResponse, ModelId
from tests.inferd_process import ServerProcess, launch


def sink() -> str:
    """Start an OTLP gRPC receiver that answers every export and keeps nothing; its endpoint."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Discard(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: object, context: object) -> object:  # noqa: N802
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Discard(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _sinks.append(server)
    return f"127.0.0.1:{port}"


_sinks: list[object] = []


def per_request_s(tracing: Tracing | None, calls: int = 50_000) -> float:
    metrics = Metrics()
    response = InferenceResponse(ModelId("digits", 1), {"y": np.zeros(1)}, None, 1e-5, 2e-5)
    with ThreadPoolExecutor(1) as pool:
        factory = ServableFactory(ThreadPool(1, "inferd-infer"))
        manager: ModelManager[Servable] = ModelManager(pool, factory.load)
        service = InferenceService(manager, metrics, tracing)
        started = time.perf_counter()
        for _ in range(calls):
            with service.call("tfserving_rest", "digits", "r1") as call:
                call.decoded = time.perf_counter()
                call.response, call.resumed = response, time.perf_counter()
        return (time.perf_counter() - started) / calls


def reading_s(readings: int = 2000) -> float:
    metrics = Metrics()
    for model in ("digits", "cnn", "ranker"):  # three models, two protocols, as a busy server has
        for protocol in ("tfserving_rest", "v2_grpc"):
            metrics.timer(model, "1", protocol).observe(*([1e-4] * 7))
            metrics.count_request(model, "1", protocol, "OK")
        metrics.batch_size(model, "1").observe(4)
    with ThreadPoolExecutor(1) as pool:
        factory = ServableFactory(ThreadPool(1, "inferd-infer"))
        manager: ModelManager[Servable] = ModelManager(pool, factory.load)
        dashboard = Dashboard(InferenceService(manager, metrics), ModelControl(None, manager), metrics)  # type: ignore[arg-type]
        started = time.perf_counter()
        for _ in range(readings):
            json.dumps(dashboard.readings())
        return (time.perf_counter() - started) / readings


def serve(repo: Path, *args: str) -> ServerProcess:
    """``inferd serve`` on ``repo``, once its digits model is AVAILABLE."""
    server = launch(repo.parent, str(repo), *args)
    try:
        server.wait_available("digits")
    except BaseException:
        server.stop()
        raise
    return server


def throughput(url: str, duration: float, dashboard_open: bool) -> float:
    stop = threading.Event()

    def page() -> None:  # what an open dashboard asks for
        ticks = 0
        with requests.Session() as session:
            while not stop.wait(1.0):
                session.get(url + "/dashboard/api/metrics", timeout=5)
                if ticks % 2 == 0:
                    session.get(url + "/dashboard/api/models", timeout=5)
                ticks += 1

    poller = threading.Thread(target=page)
    if dashboard_open:
        poller.start()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run(
            [sys.executable, "-m", "inferd", "bench", url, "--model=digits", "--concurrency=16",
             f"--duration={duration}", "--warmup=2", f"--json={out}", "--log_level=error"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        report = json.loads(out.read_text())
    stop.set()
    if dashboard_open:
        poller.join()
    return float(report["steps"][0]["requests_per_s"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="in-process measurements, best kept")
    parser.add_argument("--in_process_only", action="store_true")
    args = parser.parse_args()
    endpoint = sink()
    rate0, rate1 = Tracing(endpoint, 0.0), Tracing(endpoint, 1.0)
    # Interleaved, best of --rounds: the least disturbed figure of each on a shared machine.
    # 300 calls at rate 1 make 1800 spans: under the exporter's queue of 2048, so none is dropped.
    base = min(per_request_s(None, 20_000) for _ in range(args.rounds))
    zero = min(per_request_s(rate0, 20_000) for _ in range(args.rounds))
    one = min(per_request_s(rate1, 300) for _ in range(args.rounds))
    print(f"per request, no tracing: {base * 1e6:.2f} us (service call bookkeeping)")
    print(f"per request, tracing at rate 0: +{(zero - base) * 1e6:.2f} us")
    print(f"per request, tracing at rate 1.0: +{(one - base) * 1e6:.2f} us")
    reading = min(reading_s(200) for _ in range(args.rounds))
    print(f"one dashboard metrics reading: {reading * 1e6:.0f} us (once a second per open page)")
    if args.in_process_only:
        return 0

    from tests.models import write_onnx_digits

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_onnx_digits(repo / "digits" / "1")
        settings = {
            "dashboard closed": ((), False),
            "dashboard open": ((), True),
            "tracing at rate 0": ((f"--otel_endpoint={endpoint}", "--otel_sample_rate=0"), False),
            "tracing at rate 1": ((f"--otel_endpoint={endpoint}", "--otel_sample_rate=1"), False),
        }
        results: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(args.repeats):
            for name, (flags, dashboard_open) in settings.items():
                server = serve(repo, *flags)
                try:
                    results[name].append(throughput(server.url, args.duration, dashboard_open))
                finally:
                    server.stop()
        print("| setting | requests/s, each run |")
        print("| --- | --- |")
        for name, values in results.items():
            print(f"| {name} | {', '.join(f'{v:.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "1000")
    sys.exit(main())
