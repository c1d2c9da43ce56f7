#!/usr/bin/env python
# ruff: noqa: RUF001  (the Markdown it writes uses the multiplication sign and en dash, as report.py does)
"""inferd's wire protocols against each other: one inferd server, the CNN model, batching off.

    .venv/bin/python -m bench.protocols --repeats 3 --profile-seconds 5   # 1 s warm-up + 5 s per row
    .venv/bin/python -m bench.protocols --duration 1 --warmup 0 --repeats 1 --connections 8 --no-docs

Paths: TF Serving's v1 REST JSON, KServe V2 REST JSON and binary (Triton's binary tensor
extension), V2 gRPC (``raw_input_contents``) and TF Serving's gRPC Predict (``tensor_content``).
wrk drives the HTTP paths; Triton's perf_analyzer drives both gRPC paths and, to show what the
load generator itself changes, the V2 HTTP paths too. Rounds visit every row in turn (A, B, A, B)
and medians are reported. See bench/README.md ("Protocols").
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import models, procs, report
from bench.payloads import v1_answer, v1_body, v2_answer, v2_binary_body, v2_json_body
from bench.run import WORK, WRK_CPU, ensure_wrk, log, machine, rounded, versions
from tests.inferd_process import free_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


MODEL = "cnn"
PERF_ANALYZER = Path(sys.prefix) / "bin" / "perf_analyzer"
RESULTS = BENCH / "results" / "protocols.json"
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION_START = "<!-- protocols: written by bench/protocols.py -->"
SECTION_END = "<!-- /protocols -->"
STAGES = ("decode", "queue", "predict", "handoff", "encode", "total")
PACKAGES = ["inferd", "onnxruntime", "grpcio", "protobuf", "orjson", "numpy", "uvicorn", "tritonclient"]
TARGET_RATIO = 3.0
TARGET_SHARE = 0.20

Snapshot = dict[tuple[str, frozenset[tuple[str, str]]], float]  # (metric, labels) -> value
Files = dict[tuple[str, int], tuple[Path, dict[str, str]]]  # (route key, instances) -> body, headers


# ---------------------------------------------------------------- the paths


@dataclass(frozen=True, slots=True)
class Route:
    """One protocol path driven by one load generator."""

    path: str  # "v1 JSON", "V2 binary", ...
    protocol: str  # inferd's metrics label for it
    generator: str  # "wrk" or "perf_analyzer"
    http_path: str = ""  # wrk: the URL path
    pa_args: tuple[str, ...] = ()  # perf_analyzer: protocol arguments
    binary: bool = False  # wrk: a binary V2 body
    max_instances: int | None = None  # larger requests are not measured on this route

    @property
    def key(self) -> str:
        return f"{self.path} / {self.generator}"


V2_INFER = f"/v2/models/{MODEL}/infer"
JSON_TENSORS = ("-i", "http", "--input-tensor-format=json", "--output-tensor-format=json")
ROUTES = (
    Route("v1 JSON", "tfserving_rest", "wrk", http_path=f"/v1/models/{MODEL}:predict"),
    Route("V2 JSON", "v2_rest", "wrk", http_path=V2_INFER),
    Route("V2 binary", "v2_rest", "wrk", http_path=V2_INFER, binary=True),
    # perf_analyzer 2.41 writes only the last three dims' worth of values into JSON "data" (784 for
    # [32, 1, 28, 28]; inferd rightly answers 400), so its JSON row exists for 1 instance only
    Route("V2 JSON", "v2_rest", "perf_analyzer", pa_args=JSON_TENSORS, max_instances=1),
    Route("V2 binary", "v2_rest", "perf_analyzer", pa_args=("-i", "http")),
    Route("V2 gRPC", "v2_grpc", "perf_analyzer", pa_args=("-i", "grpc")),
    Route("TFS gRPC", "tfserving_grpc", "perf_analyzer", pa_args=("-i", "grpc", "--service-kind=tfserving")),
)


# ---------------------------------------------------------------- request bodies


def http_request(route: Route, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    if route.binary:
        return v2_binary_body(x)
    return v2_json_body(x) if route.protocol == "v2_rest" else v1_body(x)


def http_answer(route: Route, headers: dict[str, str], body: bytes) -> np.ndarray:
    """The ``probabilities`` output of an HTTP answer, whatever its format."""
    return v1_answer(body) if route.protocol == "tfserving_rest" else v2_answer(headers, body)


def perf_analyzer_data(x: np.ndarray, folder: Path) -> Path:
    """perf_analyzer's --input-data folder holding ``x`` (one raw little-endian file per input), so it
    sends what wrk sends. Its own random bytes include NaNs, which JSON cannot carry, and 2.41's
    TF Serving client sends empty tensors when given a JSON data file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input").write_bytes(x.astype("<f4").tobytes())
    return folder


# ---------------------------------------------------------------- answers, checked once


@dataclass(frozen=True, slots=True)
class Ports:
    http: int
    grpc: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http}"


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return {k.lower(): v for k, v in r.headers.items()}, r.read()


def grpc_v2_answer(ports: Ports, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return np.asarray(client.infer(MODEL, [tensor]).as_numpy("probabilities"))


def grpc_tfs_answer(ports: Ports, x: np.ndarray) -> np.ndarray:
    """TF Serving's Predict with ``tensor_content``, through the stubs the e2e tests use (generated
    from inferd's copies of TF Serving's protos: tensorflow-serving-api needs tensorflow)."""
    import grpc

    from inferd._proto import prediction_service_pb2 as ps
    from inferd._proto import prediction_service_pb2_grpc as ps_grpc
    from inferd._proto.types_pb2 import DT_FLOAT

    request = ps.PredictRequest()
    request.model_spec.name = MODEL
    tensor = request.inputs["input"]
    tensor.dtype = DT_FLOAT
    tensor.tensor_shape.dim.extend(tensor.tensor_shape.Dim(size=d) for d in x.shape)
    tensor.tensor_content = x.astype("<f4").tobytes()
    with grpc.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        stub = ps_grpc.PredictionServiceStub(channel)  # type: ignore[no-untyped-call]
        out = stub.Predict(request, timeout=30).outputs["probabilities"]
    shape = [d.size for d in out.tensor_shape.dim]
    if out.tensor_content:  # servers started with --enable_serialization_as_tensor_content
        return np.frombuffer(out.tensor_content, "<f4").reshape(shape)
    return np.array(out.float_val, np.float32).reshape(shape)  # TF Serving's default answer


def answer(route: Route, ports: Ports, x: np.ndarray) -> np.ndarray:
    if route.protocol == "v2_grpc":
        return grpc_v2_answer(ports, x)
    if route.protocol == "tfserving_grpc":
        return grpc_tfs_answer(ports, x)
    body, headers = http_request(route, x)
    return http_answer(route, *post(ports.base + route.http_path, body, headers))


def check_answers(ports: Ports, model_file: Path, batches: list[int]) -> dict[str, float]:
    """Every path's answer against onnxruntime in-process; the largest difference per path.

    Raises:
        RuntimeError: a path answered differently (beyond float32 printing in JSON).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file))
    worst: dict[str, float] = {}
    for n in batches:
        x = models.instances(MODEL, n)
        want = session.run(None, {"input": x})[0]
        for path, route in {r.path: r for r in reversed(ROUTES)}.items():  # wrk's, where there are two
            got = answer(route, ports, x).reshape(want.shape)
            diff = float(np.abs(got - want).max())
            if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"{path}, {n} instances: differs from onnxruntime by {diff}")
            worst[path] = max(worst.get(path, 0.0), diff)
    return worst


# ---------------------------------------------------------------- the server and its metrics


def start_server(repo: Path, work: Path) -> tuple[procs.ServerProcess, Ports]:
    ports = Ports(free_port(), free_port())
    cmd = [
        str(Path(sys.prefix) / "bin" / "inferd"),
        "serve",
        str(repo),
        f"--rest_api_port={ports.http}",
        f"--port={ports.grpc}",
        "--host=127.0.0.1",
    ]
    server = procs.ServerProcess(cmd, work, dict(os.environ), work / "server.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"inferd exited:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{ports.base}/v2/models/{MODEL}/ready", timeout=5) as r:
                if r.status == 200:
                    return server, ports
        except OSError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"inferd not ready after 60 s:\n{server.log_tail()}")


_SAMPLE = re.compile(r"^(inferd_\w+)\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(ports: Ports) -> Snapshot:
    with urllib.request.urlopen(f"{ports.base}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (name, frozenset(_LABEL.findall(labels))): float(value)
        for name, labels, value in _SAMPLE.findall(text)
    }


def delta(before: Snapshot, after: Snapshot, metric: str, **labels: str) -> float:
    """The change of ``metric`` summed over the series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == metric and wanted <= k[1])


def stage_times(before: Snapshot, after: Snapshot, protocol: str) -> dict[str, float] | None:
    """Mean seconds per request in each stage over the window, or None where inferd recorded none."""
    counted = delta(before, after, "inferd_request_duration_seconds_count", protocol=protocol, stage="total")
    if counted <= 0:
        return None
    return {
        stage: delta(before, after, "inferd_request_duration_seconds_sum", protocol=protocol, stage=stage)
        / counted
        for stage in STAGES
    }


# ---------------------------------------------------------------- load generators


@dataclass(frozen=True, slots=True)
class Load:
    """What a generator measured: client-side rate and latency."""

    req_per_s: float
    p50_ms: float
    p99_ms: float
    client_errors: int


def run_wrk(wrk: str, url: str, body: Path, headers: dict[str, str], c: int, seconds: float) -> Load:
    cmd = [
        "taskset", "-c", WRK_CPU, wrk, "-t1", f"-c{c}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
        "-s", str(BENCH / "wrk_post_headers.lua"), url, "--", str(body),
        *(f"{k}: {v}" for k, v in headers.items()),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((out for out in done.stdout.splitlines() if out.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result (rc {done.returncode}): {done.stderr[-500:]}")
    res = json.loads(line.removeprefix("WRKJSON "))
    errors = sum(res[k] for k in ("non2xx", "connect_errors", "read_errors", "write_errors", "timeouts"))
    return Load(
        (res["requests"] - res["non2xx"]) / (res["duration_us"] / 1e6),
        res["p50_us"] / 1000,
        res["p99_us"] / 1000,
        errors,
    )


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer links libcudart (no GPU used): the nvidia-cuda-runtime wheel's copy."""
    import nvidia.cuda_runtime

    lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    return {**os.environ, "LD_LIBRARY_PATH": str(lib)}


def run_perf_analyzer(route: Route, ports: Ports, data: Path, n: int, c: int, seconds: float) -> Load:
    """Three windows of ``seconds / 3`` each; the stability check is off (-s 1000), so it stops
    after three, and its numbers are over those windows."""
    port = ports.grpc if "grpc" in route.pa_args else ports.http
    out = data.parent / f"{data.name}.csv"
    cmd = [
        str(PERF_ANALYZER), "-m", MODEL, "-u", f"127.0.0.1:{port}", *route.pa_args,
        "--shape", f"input:{n},1,28,28", "--input-data", str(data), "--concurrency-range", str(c),
        "--measurement-interval", str(max(100, round(seconds * 1000 / 3))), "-s", "1000", "-r", "3",
        "-f", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds * 3 + 120, env=perf_analyzer_env()
    )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"perf_analyzer failed (rc {done.returncode}): {(done.stdout + done.stderr)[-800:]}"
        )
    row = next(csv.DictReader(out.read_text().splitlines()))
    out.unlink()
    return Load(
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000,
        float(row["p99 latency"]) / 1000,
        0,  # perf_analyzer stops at the first failed request (rc != 0 above)
    )


# ---------------------------------------------------------------- one row


@dataclass(frozen=True, slots=True)
class Rig:
    """Everything a row needs: the server, its ports, wrk, and the request files per batch size."""

    server: procs.ServerProcess
    ports: Ports
    wrk: str
    files: Files


def load(rig: Rig, route: Route, n: int, c: int, seconds: float) -> Load:
    path, headers = rig.files[(route.key, n)]
    if route.generator == "wrk":
        return run_wrk(rig.wrk, rig.ports.base + route.http_path, path, headers, c, seconds)
    return run_perf_analyzer(route, rig.ports, path, n, c, seconds)


def measure(rig: Rig, route: Route, n: int, c: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measured row: warm-up, then load between two metrics scrapes and CPU readings."""
    if args.warmup > 0:
        load(rig, route, n, c, args.warmup)
    pids = rig.server.pids()
    before, cpu0 = scrape(rig.ports), procs.cpu_seconds(pids)
    got = load(rig, route, n, c, args.duration)
    cpu1, after = procs.cpu_seconds(rig.server.pids() | pids), scrape(rig.ports)
    served = delta(before, after, "inferd_requests_total", protocol=route.protocol, status="OK")
    failed = delta(before, after, "inferd_requests_total", protocol=route.protocol) - served
    stages = stage_times(before, after, route.protocol)
    return {
        "path": route.path,
        "generator": route.generator,
        "protocol": route.protocol,
        "instances": n,
        "connections": c,
        "req_per_s": got.req_per_s,
        "pred_per_s": got.req_per_s * n,
        "p50_ms": got.p50_ms,
        "p99_ms": got.p99_ms,
        "errors": got.client_errors + failed,
        "cpu_s_per_1k_pred": (cpu1 - cpu0) / (served * n) * 1000 if served else None,
        "stage_us": {k: v * 1e6 for k, v in stages.items()} if stages else None,
        "serialisation_share": (stages["decode"] + stages["encode"]) / stages["total"] if stages else None,
    }


# ---------------------------------------------------------------- py-spy


CODECS = "inferd wire codecs (protocols/: JSON, binary and protobuf tensors <-> numpy)"
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model (onnxruntime)", ("onnxruntime/",)),
    (CODECS, ("inferd/protocols/",)),
    ("inferd core and HTTP app (service, metrics, server.py)", ("inferd/",)),
    ("HTTP server (uvicorn, httptools)", ("uvicorn/", "httptools", "h11/")),
    ("gRPC Python layer", ("grpc/",)),
    (
        "event loop's C code (uvloop's socket I/O, httptools' HTTP parsing, gRPC's Cython core, "
        "which parses and writes the protobuf messages)",
        ("asyncio/runners.py",),
    ),
    (
        "threads parked in C (thread-pool queue, gRPC poller; py-spy --nonblocking counts some as busy)",
        ("concurrent/futures/", "threading.py"),
    ),
    ("asyncio (Python)", ("asyncio/",)),
)


def category(leaf: str) -> str:
    """The category of a sample by its innermost Python frame, "function (file:line)"."""
    return next((name for name, parts in CATEGORIES if any(p in leaf for p in parts)), "other")


def profile(rig: Rig, route: Route, n: int, c: int, seconds: float, out: Path) -> dict[str, Any]:
    """py-spy (Python frames, 250 samples/s, every thread, on-CPU only) on the server while ``route``
    is under load: the share of samples whose innermost Python frame is in each category."""
    raw = out / f"pyspy-{route.path.replace(' ', '_')}-{route.generator}-n{n}.txt"
    spy = subprocess.Popen(
        [
            str(Path(sys.prefix) / "bin" / "py-spy"),
            "record",
            "-p",
            str(rig.server.pid),
            "-d",
            str(round(seconds)),
            "-r",
            "250",
            "-f",
            "raw",
            "-o",
            str(raw),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    load(rig, route, n, c, seconds)
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed: {err[-500:]}")
    counts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        counts[category(leaf)] = counts.get(category(leaf), 0) + int(count)
    total = sum(counts.values())
    return {
        "path": route.path,
        "generator": route.generator,
        "instances": n,
        "connections": c,
        "samples": total,
        "shares": {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])},
        "collapsed_stacks": str(raw.relative_to(ROOT)),
    }


# ---------------------------------------------------------------- aggregation and report


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["path"], r["generator"], r["instances"], r["connections"]), []).append(r)
    rows = []
    for (path, gen, n, c), rs in groups.items():
        row: dict[str, Any] = {
            "path": path,
            "generator": gen,
            "instances": n,
            "connections": c,
            "runs": len(rs),
        }
        for k in (
            "req_per_s",
            "pred_per_s",
            "p50_ms",
            "p99_ms",
            "errors",
            "cpu_s_per_1k_pred",
            "serialisation_share",
        ):
            vals = [r[k] for r in rs if r.get(k) is not None]
            row[k] = statistics.median(vals) if vals else None
        stages = [r["stage_us"] for r in rs if r.get("stage_us")]
        row["stage_us"] = {s: statistics.median(st[s] for st in stages) for s in STAGES} if stages else None
        row["pred_per_s_all"] = [r["pred_per_s"] for r in rs]
        row["protocol"] = rs[0]["protocol"]
        rows.append(row)
    return rows


def find(rows: list[dict[str, Any]], path: str, generator: str, n: int, c: int) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if (r["path"], r["generator"], r["instances"], r["connections"]) == (path, generator, n, c)
        ),
        None,
    )


def targets(rows: list[dict[str, Any]], profiles: list[dict[str, Any]], c: int) -> list[str]:
    """The issue's targets at 32 instances per request and ``c`` connections, met or not; with the
    py-spy share of inferd's wire codecs where that path was profiled."""
    ref = find(rows, "v1 JSON", "wrk", 32, c)
    lines = []
    for path, gen in (
        ("V2 binary", "wrk"),
        ("V2 binary", "perf_analyzer"),
        ("V2 gRPC", "perf_analyzer"),
        ("TFS gRPC", "perf_analyzer"),
    ):
        row = find(rows, path, gen, 32, c)
        if not (row and ref and ref["pred_per_s"]):
            continue
        ratio = row["pred_per_s"] / ref["pred_per_s"]
        share = row["serialisation_share"]
        share_text = (
            f"{share:.0%} ({'met' if share < TARGET_SHARE else 'NOT met'})"
            if share is not None
            else "not recorded by inferd"
        )
        met = "met" if ratio >= TARGET_RATIO else "NOT met"
        spy = next((p for p in profiles if (p["path"], p["generator"]) == (path, gen)), None)
        codecs = f"{spy['shares'].get(CODECS, 0.0):.0%}" if spy else "–"
        lines.append(f"| {path} ({gen}) | {ratio:.2f}× ({met}) | {share_text} | {codecs} |")
    return lines


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| path | load | n | c | req/s | pred/s | vs v1 JSON | p50 ms | p99 ms | CPU s/1k pred "
        "| decode µs | queue µs | predict µs | handoff µs | encode µs | total µs | (decode+encode)/total "
        "| errors |",
        "| --- | --- |" + " ---: |" * 16,
    ]
    for r in sorted(rows, key=lambda r: (r["instances"], r["connections"])):
        ref = find(rows, "v1 JSON", "wrk", r["instances"], r["connections"])
        st = r["stage_us"] or {}
        share = r["serialisation_share"]
        cells = [
            r["path"],
            r["generator"],
            str(r["instances"]),
            str(r["connections"]),
            report._f(r["req_per_s"]),
            report._f(r["pred_per_s"]),
            report._ratio(r["pred_per_s"], ref["pred_per_s"] if ref else None),
            report._f(r["p50_ms"], 2),
            report._f(r["p99_ms"], 2),
            report._f(r["cpu_s_per_1k_pred"], 3),
            *(report._f(st.get(stage)) for stage in STAGES),
            "–" if share is None else f"{share:.0%}",
            report._f(r["errors"]),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def profile_lines(profiles: list[dict[str, Any]]) -> list[str]:
    out = []
    for p in profiles:
        out.append(
            f"- {p['path']} ({p['generator']}), {p['instances']} instances, c{p['connections']}, "
            f"{p['samples']:,} samples:"
        )
        out += [f"  - {share:.0%} {name}" for name, share in p["shares"].items()]
    return out


def missing_stages(rows: list[dict[str, Any]]) -> list[str]:
    missing = sorted({(r["path"], r["protocol"]) for r in rows if r["stage_us"] is None})
    if not missing:
        return []
    paths = ", ".join(f'{path} (`protocol="{protocol}"`)' for path, protocol in missing)
    return [
        f"No stage columns for {paths}: inferd counted these requests in `inferd_requests_total` but "
        "recorded no `inferd_request_duration_seconds` for them in this run, so their serialisation "
        "share comes from py-spy only.",
        "",
    ]


def spread(rows: list[dict[str, Any]]) -> str:
    """How far a row's pred/s moved between rounds: (max - min) / median, over all rows."""
    moves = sorted(
        ((max(r["pred_per_s_all"]) - min(r["pred_per_s_all"])) / r["pred_per_s"], r)
        for r in rows
        if len(r["pred_per_s_all"]) > 1 and r["pred_per_s"]
    )
    if not moves:
        return "With one round there is no measure of the spread."
    worst, row = moves[-1]
    return (
        f"Between rounds a row's pred/s moved by a median of {statistics.median(m for m, _ in moves):.0%} "
        f"of its value (most: {worst:.0%}, {row['path']} / {row['generator']}, n={row['instances']}, "
        f"c={row['connections']}); differences smaller than that are not findings."
    )


def section(results: dict[str, Any]) -> str:
    s, m, rows = results["settings"], results["machine"], results["rows"]
    c = s["connections"][-1]
    out = [
        SECTION_START,
        "## Protocols: v1 JSON, V2 JSON, V2 binary and gRPC (CNN model)",
        "",
        "One inferd server (batching off) serving `cnn` (float32 [N, 1, 28, 28] in, [N, 10] out), every "
        "path in the same run. Produced by `bench/protocols.py`:",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- date: {results['date']}; machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, "
        f"Python {m['python']}; the run took {results['elapsed_s'] / 60:.0f} minutes.",
        f"- each row: {s['warmup']:g} s warm-up, {s['duration']:g} s measured; {s['repeats']} rounds "
        "visiting every row in turn (A, B, A, B); medians over rounds. wrk (1 thread, pinned to CPU "
        f"{WRK_CPU}) drives the HTTP paths; perf_analyzer (`--input-data` with wrk's instances, 3 windows "
        "of a third of the measured time, stability check off) drives both gRPC paths and, for comparison, "
        "the V2 HTTP paths (its V2 JSON row only at 1 instance: perf_analyzer 2.41 writes just one "
        "instance's values into a JSON `data` array, 784 for [32, 1, 28, 28], which inferd rightly "
        "refuses). Every path's answer was checked against onnxruntime in-process first "
        "(largest difference: "
        + ", ".join(f"{k} {v:.1g}" for k, v in results["answer_max_diff"].items())
        + ").",
        "- `CPU s/1k pred`: the server process's CPU-seconds per 1,000 predictions (requests inferd counted "
        "over the window). Stage columns: mean µs per request from inferd's "
        "`inferd_request_duration_seconds` histograms (sum deltas over the window / count); "
        "`(decode+encode)/total` is the serialisation share. gRPC's own protobuf parsing and "
        "serialising, and the HTTP server's parsing, happen outside these stages; `queue` is the wait "
        "for a predict thread; `handoff` holds validation and the event loop's delay in taking the "
        "answer back from the predict thread (long when the loop is saturated).",
        "",
        *table(rows),
        "",
        *missing_stages(rows),
        f"### Targets (32 instances per request, {c} connections, against v1 JSON with wrk)",
        "",
        f"| path | throughput vs v1 JSON (target ≥ {TARGET_RATIO:g}×) "
        f"| serialisation share (target < {TARGET_SHARE:.0%}), inferd's stage metrics "
        "| inferd's wire codecs in py-spy's samples |",
        "| --- | ---: | ---: | ---: |",
        *targets(rows, results["profiles"], c),
        "",
    ]
    if results["profiles"]:
        out += [
            "### Where the server's time goes (py-spy)",
            "",
            "py-spy on the server process under the same load, after the measured rows; share of on-CPU "
            "samples by the innermost Python frame. C calls such as orjson, numpy and onnxruntime count "
            "under the Python function that made them; C and Cython code that the event loop runs "
            "directly (uvloop, httptools, gRPC's core, where protobuf messages are parsed and written) "
            "has no Python frame of its own and counts as the event loop's C code. Stacks: "
            "`bench/.work/protocols/pyspy-*.txt` (scratch, not committed).",
            "",
            *profile_lines(results["profiles"]),
            "",
        ]
    out += [
        "Noise: " + s["noise_note"] + " " + spread(rows) + f" Load average (1 min) before the run "
        f"{results['load_before']:.2f}, after it {results['load_after']:.2f}.",
        "",
        f"Raw numbers: `{RESULTS.relative_to(ROOT)}`.",
        SECTION_END,
    ]
    return "\n".join(out)


def write_docs(text: str) -> None:
    """Replace the section in docs/benchmarks.md (between its markers), or append it."""
    report.replace_section(DOCS, text)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", nargs="+", type=int, default=[1, 32], help="instances per request")
    p.add_argument(
        "--connections",
        nargs="+",
        type=int,
        default=[1, 8],
        help="concurrent requests; the last is the targets'",
    )
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per row and round")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each row")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all rows; medians are reported")
    p.add_argument(
        "--profile-seconds",
        type=float,
        default=0.0,
        help="py-spy each binary path at 32 instances for this long after the rows (0: off)",
    )
    p.add_argument(
        "--noise-note",
        default="the machine had no other load that this script knows of.",
        help="what to say about other load on the machine during the run",
    )
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="RESULTS",
        help="measure nothing: rewrite the docs section from a results file (e.g. after run.py)",
    )
    p.add_argument(
        "--no-docs", action="store_true", help="write the JSON under bench/.work/ and leave docs alone"
    )
    a = p.parse_args()
    a.command = shlex.join([".venv/bin/python", "-m", "bench.protocols", *sys.argv[1:]])
    return a


def make_files(work: Path, batches: list[int]) -> Files:
    files: Files = {}
    for n in batches:
        x = models.instances(MODEL, n)
        data = perf_analyzer_data(x, work / f"perf-analyzer-n{n}")
        for route in ROUTES:
            if route.generator == "perf_analyzer":
                files[(route.key, n)] = (data, {})
                continue
            body, headers = http_request(route, x)
            path = work / f"{route.key.replace(' ', '_').replace('/', '')}-n{n}.body"
            path.write_bytes(body)
            files[(route.key, n)] = (path, headers)
    return files


def main() -> int:
    args = parse_args()
    if args.from_json:
        write_docs(section(json.loads(args.from_json.read_text())))
        return 0
    procs.install_cleanup()
    started, load_before = time.monotonic(), os.getloadavg()[0]
    work = WORK / "protocols"
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "models"
    model_file = models.repository_of(repo, MODEL, WORK / "models")

    server, ports = start_server(repo, work)
    rig = Rig(server, ports, ensure_wrk(), make_files(work, args.instances))
    try:
        diffs = check_answers(ports, model_file, args.instances)
        log(f"inferd up on {ports}; answers match onnxruntime on every path: {diffs}")
        runs = []
        for rnd in range(args.repeats):
            for n in args.instances:
                for c in args.connections:
                    for route in (r for r in ROUTES if n <= (r.max_instances or n)):
                        row = {"round": rnd, **measure(rig, route, n, c, args)}
                        runs.append(row)
                        log(
                            f"r{rnd} {route.key:26s} n={n:<2d} c={c:<2d} {row['pred_per_s']:7.0f} pred/s "
                            f"p50 {row['p50_ms']:6.2f} p99 {row['p99_ms']:7.2f} ms "
                            f"share {report._f(row['serialisation_share'], 2)} err {row['errors']:.0f}"
                        )
        profiles = [
            profile(rig, route, 32, args.connections[-1], args.profile_seconds, work)
            for route in ROUTES
            if args.profile_seconds > 0 and (route.binary or "grpc" in route.protocol)
        ]
    finally:
        server.stop()

    results = {
        "command": args.command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "instances": args.instances,
            "connections": args.connections,
            "duration": args.duration,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "noise_note": args.noise_note,
        },
        "elapsed_s": round(time.monotonic() - started),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "versions": versions(Path(sys.prefix), PACKAGES),
        "answer_max_diff": diffs,
        "rows": medians(runs),
        "profiles": profiles,
        "runs": runs,
    }
    out = work / "protocols.json" if args.no_docs else RESULTS
    out.write_text(json.dumps(rounded(results), indent=1) + "\n")
    if not args.no_docs:
        write_docs(section(results))
    log(f"wrote {out.relative_to(ROOT)}" + ("" if args.no_docs else f" and {DOCS.relative_to(ROOT)}"))
    print("\n".join([*table(results["rows"]), "", *targets(results["rows"], profiles, args.connections[-1])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
