"""inferd's benchmark: inferd against the servers people use instead, driven by the same load
generator (``inferd bench`` by default, ``--loadgen wrk`` for wrk), each server pinned to CPU 0
and the load generator to CPU 1.

    python -m bench.run                  # the full run; writes docs/benchmarks.md
    python -m bench.run --quick          # smoke test (digits, 1 instance, c=1 and 64)
    python -m bench.run --quick --only inferd fastapi
    python -m bench.run --perf           # issue 17's table and targets (bench/perf.py)

See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import bounds, models, perf, procs, report
from bench.servers import Context, Launch, Server, Wire, all_servers
from tests.inferd_process import free_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".venvs"
JSON_HEADERS = {"Content-Type": "application/json"}
WORK = BENCH / ".work"
WRK_CPU = "1"  # the load generator runs pinned to this CPU (taskset)
SERVER_CPUS = "0"  # and each server to these (--server-cpus; empty: not pinned)

Row = dict[str, Any]
"""One measured (or failed) row: server, variant, model, instances, connections and the numbers."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- installs


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk missing: apt-get install -y wrk")
    if subprocess.run(["apt-get", "install", "-y", "wrk"], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True)
    return shutil.which("wrk") or "wrk"


def ensure_venv(server: Server) -> tuple[Path, str | None]:
    """The server's venv, installed by package name if missing; (path, error or None)."""
    if server.uses_project_venv:
        return Path(sys.prefix), None
    venv = VENVS / server.name
    marker = venv / ".bench-installed"
    wanted = " ".join(server.packages)
    if marker.exists() and marker.read_text() == wanted:
        return venv, None
    log(f"installing {server.name}: pip install {wanted}")
    try:
        if not (venv / "bin" / "python").exists():
            subprocess.run(
                [sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True
            )
        done = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", *server.packages], capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = "\n".join(line for line in done.stderr.splitlines() if "is ignored" not in line)[-1500:]
            return venv, f"pip install {wanted} failed: {tail}"
    except Exception as exc:
        return venv, f"installing {server.name} failed: {exc}"
    marker.write_text(wanted)
    return venv, None


def versions(venv: Path, names: Sequence[str]) -> dict[str, str]:
    py = venv / "bin" / "python"
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except Exception: out[n] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True)
    try:
        found: dict[str, str] = json.loads(done.stdout)
        return found
    except ValueError:
        return {n: "?" for n in names}


# ---------------------------------------------------------------- requests and load


def exchange(
    url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """POST ``body``; (status, answer headers with lower-case names, answer body)."""
    req = urllib.request.Request(url, data=body, headers=headers or JSON_HEADERS, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """POST a JSON ``body``; (status, answer body)."""
    status, _, answer = exchange(url, body, timeout=timeout)
    return status, answer


def run_wrk(
    wrk: str,
    url: str,
    body_file: Path,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``wrk -t1`` pinned to WRK_CPU, POSTing the file's bytes with ``headers`` (JSON by default);
    the JSON line ``wrk_post.lua`` prints."""
    extra = [f"{k}: {v}" for k, v in (headers or {}).items() if k.lower() != "content-type"]
    kind = (headers or JSON_HEADERS).get("Content-Type", "application/json")
    cmd = [
        "taskset", "-c", WRK_CPU, wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(BENCH / "wrk_post_headers.lua"), url, "--", str(body_file),
        f"Content-Type: {kind}", *extra,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRKJSON "):
            result: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
            return result
    raise RuntimeError(
        f"wrk printed no result (rc {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}"
    )


def run_inferd_bench(
    target: str, protocol_args: list[str], connections: int, seconds: float
) -> dict[str, Any]:
    """``inferd bench`` (closed loop, one process) pinned like wrk, at ``target`` with
    ``protocol_args`` saying what to send; its JSON turned into the fields run_wrk returns."""
    cmd = [
        "taskset", "-c", WRK_CPU, sys.executable, "-m", "inferd", "bench", target, *protocol_args,
        f"--concurrency={connections}", f"--duration={seconds}", "--warmup=0", "--timeout=10",
        "--metrics-url=", "--json=-",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"inferd bench failed (rc {done.returncode}): {done.stderr[-800:]}")
    (step,) = json.loads(done.stdout)["steps"]
    errors = step["errors"]
    # Answers that failed: HTTP statuses ("503") and gRPC codes ("UNAVAILABLE"); the rest are
    # the network's (connect_error, connection_error, timeout).
    answered = {k: v for k, v in errors.items() if k not in ("connect_error", "connection_error", "timeout")}
    latency = {k: (v if v is not None else float("nan")) * 1000 for k, v in step["latency_ms"].items()}
    return {
        "requests": step["requests"] - sum(v for k, v in errors.items() if k not in answered),  # answered
        "duration_us": int(seconds * 1e6),
        "non2xx": sum(answered.values()),
        "statuses": answered,
        "connect_errors": errors.get("connect_error", 0),
        "read_errors": errors.get("connection_error", 0),
        "write_errors": 0,
        "timeouts": errors.get("timeout", 0),
        "p50_us": latency["p50"],
        "p90_us": latency["p90"],
        "p99_us": latency["p99"],
        "p999_us": latency["p99.9"],
        "lat_max_us": latency["max"],
    }


@dataclass(frozen=True)
class Load:
    """What one row sends, to whom, and with which generator."""

    server: Server
    variant: str
    model: str
    instances: int
    launch: Launch
    body: Path  # the request body (HTTP wires)
    headers: dict[str, str]


def run_load(
    args: argparse.Namespace, wrk: str, load: Load, connections: int, seconds: float
) -> dict[str, Any]:
    """One closed-loop run of ``seconds``: wrk or inferd bench for HTTP (``--loadgen``; a binary
    body goes with inferd bench as its own generated V2 binary request), inferd bench for gRPC."""
    if load.server.wire(load.variant) is Wire.GRPC:
        assert load.launch.grpc_target, f"{load.server.name}:{load.variant} has no gRPC target"
        grpc_args = ["--protocol=grpc", f"--model={load.model}", f"--instances={load.instances}"]
        return run_inferd_bench(load.launch.grpc_target, grpc_args, connections, seconds)
    if args.loadgen == "wrk":
        return run_wrk(wrk, load.launch.url, load.body, connections, seconds, load.headers)
    parts = urllib.parse.urlsplit(load.launch.url)
    root = f"{parts.scheme}://{parts.netloc}"
    if load.headers.get("Content-Type") == "application/octet-stream":
        binary = ["--protocol=v2-binary", f"--model={load.model}", f"--instances={load.instances}"]
        return run_inferd_bench(root, binary, connections, seconds)
    http = ["--model=bench", f"--path={parts.path or '/'}", f"--payload={load.body}"]
    return run_inferd_bench(root, http, connections, seconds)


# ---------------------------------------------------------------- one server session


def start(
    server: Server, ctx: Context, cleanup: list[Path], server_cpus: str
) -> tuple[procs.ServerProcess, Launch, float]:
    """Start ``server`` (pinned to ``server_cpus`` with taskset unless empty) and wait until it
    answers a one-instance request; (process, launch, seconds it took)."""
    port = free_port()
    launch = server.launch(ctx, port)
    cleanup += launch.cleanup
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{ctx.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(launch.env)
    t0 = time.monotonic()
    pin = ["taskset", "-c", server_cpus] if server_cpus else []
    proc = procs.ServerProcess([*pin, *launch.cmd], launch.cwd, env, ctx.work / "server.log")
    x = models.instances(ctx.model, 1)
    probe, headers = server.body(x, ctx.variant), server.headers(x, ctx.variant)
    last = "no answer yet"
    while time.monotonic() - t0 < launch.startup_timeout:
        if not proc.alive():
            raise RuntimeError(
                f"exited with {proc.proc.returncode} before answering (log {proc.log_path}):\n"
                f"{proc.log_tail(8)}"
            )
        if launch.not_ready is not None:
            why = launch.not_ready()
            if why is not None:
                last = why
                time.sleep(0.5)
                continue
        try:
            status, _, answer = exchange(launch.url, probe, headers, timeout=5)
            if status == 200:
                return proc, launch, time.monotonic() - t0
            last = f"HTTP {status}: {answer[:300]!r}"
        except Exception as exc:
            last = str(exc)
        time.sleep(0.5)
    proc.stop()
    raise RuntimeError(
        f"not ready after {launch.startup_timeout:.0f} s: {last} (log {proc.log_path}):\n{proc.log_tail(8)}"
    )


def check_answers(server: Server, variant: str, url: str, model: str, model_file: Path, n: int) -> None:
    """The server's answer for ``n`` instances equals onnxruntime's in this process (HTTP; a gRPC
    variant is checked over its server's REST API)."""
    import onnxruntime as ort

    x = models.instances(model, n)
    want = ort.InferenceSession(str(model_file)).run(None, {"input": x})[0]
    status, headers, answer = exchange(url, server.body(x, variant), server.headers(x, variant))
    if status != 200:
        raise RuntimeError(f"check with {n} instances: HTTP {status}: {answer[:300]!r}")
    got = server.predictions(answer, headers, variant).reshape(want.shape)
    if not np.allclose(got, want, atol=1e-4):
        raise RuntimeError(
            f"check with {n} instances: answers differ from onnxruntime's (max diff {abs(got - want).max()})"
        )


@dataclass(frozen=True)
class Session:
    """One server variant started afresh for one model, then loaded with each (instances,
    connections) scenario in turn."""

    server: Server
    variant: str
    model: str
    scenarios: tuple[tuple[int, int], ...]

    @property
    def key(self) -> str:
        return f"{self.server.name}-{self.variant}"


def measure(
    args: argparse.Namespace, wrk: str, proc: procs.ServerProcess, load: Load, connections: int
) -> Row:
    """Warm-up, then the measured run, with the server tree's CPU time and memory around it."""
    if args.warmup > 0:
        run_load(args, wrk, load, connections, args.warmup)
        time.sleep(args.settle)
    pids = proc.pids()
    cpu0 = procs.cpu_seconds(pids)
    with procs.MemorySampler(proc) as mem:
        res = run_load(args, wrk, load, connections, args.duration)
    cpu1 = procs.cpu_seconds(proc.pids() | pids)
    time.sleep(args.idle_wait)
    idle = procs.memory_bytes(proc.pids())
    secs = res["duration_us"] / 1e6
    ok = res["requests"] - res["non2xx"]
    errors = (
        res["non2xx"] + res["connect_errors"] + res["read_errors"] + res["write_errors"] + res["timeouts"]
    )
    preds = ok * load.instances
    cpu = cpu1 - cpu0
    return {
        "req_per_s": ok / secs,
        "pred_per_s": preds / secs,
        "p50_ms": res["p50_us"] / 1000,
        "p99_ms": res["p99_us"] / 1000,
        "errors": errors,
        "requests": res["requests"],
        "cpu_s_per_1k_pred": cpu / preds * 1000 if preds else None,
        "cpu_us_per_req": cpu / ok * 1e6 if ok else None,
        "statuses": res["statuses"],
        "peak_mem_mib": mem.peak / 2**20,
        "idle_mem_mib": idle / 2**20,
        "wrk": res,
    }


def session(
    args: argparse.Namespace,
    wrk: str,
    plan: Session,
    venv: Path,
    model_file: Path,
    rnd: int,
    bodies: dict[tuple[str, str, str, int], Path],
) -> list[Row]:
    """Run one planned session; one row per scenario, failed rows carrying ``error``."""
    server, variant, model = plan.server, plan.variant, plan.model
    work = WORK / "runs" / f"{plan.key}-{model}-r{rnd}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx = Context(ROOT, work, venv, model, model_file.parents[2], model_file, variant)
    base: Row = {"server": server.name, "variant": variant, "model": model, "round": rnd}
    base["wire"] = server.wire(variant).value
    rows: list[Row] = []
    proc = None
    cleanup: list[Path] = []
    try:
        proc, launch, startup_s = start(server, ctx, cleanup, args.server_cpus)
        for n in sorted({n for n, _ in plan.scenarios}):
            check_answers(server, variant, launch.url, model, model_file, n)
        log(
            f"  {plan.key} {model} up in {startup_s:.1f} s, answers checked; tree {len(proc.pids())} "
            f"processes, {procs.memory_bytes(proc.pids()) / 2**20:.0f} MiB"
        )
        for n, c in plan.scenarios:
            row: Row = {**base, "instances": n, "connections": c, "startup_s": startup_s}
            try:
                x = models.instances(model, n)
                load = Load(server, variant, model, n, launch, bodies[(server.name, variant, model, n)],
                            server.headers(x, variant))  # fmt: skip
                row |= measure(args, wrk, proc, load, c)
                log(
                    f"  {plan.key:24s} {model:6s} n={n:<2d} c={c:<2d} {row['req_per_s']:8.0f} req/s "
                    f"p50 {row['p50_ms']:7.2f} p99 {row['p99_ms']:8.2f} ms err {row['errors']} "
                    f"cpu {row['cpu_us_per_req'] or 0:.0f} us/req peak {row['peak_mem_mib']:.0f} MiB"
                )
                if not proc.alive():
                    raise RuntimeError(f"server died: {proc.log_tail()}")
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"  {plan.key} {model} n={n} c={c}: FAILED {row['error'][:300]}")
            rows.append(row)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        log(f"  {plan.key} {model}: FAILED {msg[:400]}")
        rows = [{**base, "instances": n, "connections": c, "error": msg[:2000]} for n, c in plan.scenarios]
    finally:
        if proc is not None:
            proc.stop()
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- aggregation


METRICS = (
    "req_per_s",
    "pred_per_s",
    "p50_ms",
    "p99_ms",
    "errors",
    "cpu_s_per_1k_pred",
    "cpu_us_per_req",
    "peak_mem_mib",
    "idle_mem_mib",
    "startup_s",
)


def aggregate(rows: list[Row]) -> list[Row]:
    """Medians over rounds, one row per (server, variant, model, instances, connections)."""
    groups: dict[tuple[str, str, str, int, int], list[Row]] = {}
    for r in rows:
        groups.setdefault(
            (r["server"], r["variant"], r["model"], r["instances"], r["connections"]), []
        ).append(r)
    out = []
    for (s, v, m, n, c), rs in groups.items():
        good = [r for r in rs if "error" not in r]
        agg: Row = {
            "server": s,
            "variant": v,
            "wire": rs[0].get("wire", "http"),
            "model": m,
            "instances": n,
            "connections": c,
            "runs": len(rs),
            "ok_runs": len(good),
        }
        for k in METRICS:
            vals = [r[k] for r in good if r.get(k) is not None]
            agg[k] = statistics.median(vals) if vals else None
        if good:
            agg["pred_per_s_all"] = [round(r["pred_per_s"], 1) for r in good]
        errs = sorted({r["error"] for r in rs if "error" in r})
        if errs:
            agg["failures"] = errs
        out.append(agg)
    return out


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke test: digits, 1 instance, c=1 and 64, short runs"
    )
    p.add_argument(
        "--perf",
        action="store_true",
        help="issue 17's table only (floors, inferd over each wire, FastAPI typed and untyped; "
        "bench/perf.py) and its targets; with --quick, 2 s per row",
    )
    p.add_argument(
        "--only", nargs="+", metavar="NAME", help="servers to run (NAME or NAME:variant); default all"
    )
    p.add_argument("--models", nargs="+", choices=models.MODELS)
    p.add_argument("--instances", nargs="+", type=int)
    p.add_argument("--connections", nargs="+", type=int)
    p.add_argument(
        "--duration", type=float, help="seconds of measured load per row and run (default 10, quick 3)"
    )
    p.add_argument("--warmup", type=float, help="seconds of unmeasured load before each (default 2, quick 1)")
    p.add_argument(
        "--settle",
        type=float,
        help="seconds between the warm-up and the measured run, past the servers' 5 s keep-alive, "
        "so that the warm-up's dropped connections do not lengthen the measured tail "
        "(default 6, quick 0; bench/tail.py)",
    )
    p.add_argument(
        "--repeats", type=int, help="rounds over all servers; medians are reported (default 3, quick 1)"
    )
    p.add_argument(
        "--idle-wait", type=float, default=1.0, help="seconds after load before idle memory is read"
    )
    p.add_argument(
        "--bound-seconds", type=float, help="seconds per in-process bound loop (default 3, quick 1)"
    )
    p.add_argument(
        "--loadgen",
        choices=["inferd", "wrk"],
        help="load generator for HTTP rows: inferd bench or wrk with bench/wrk_post_headers.lua "
        "(default: wrk with --perf, else inferd); gRPC rows always use inferd bench",
    )
    p.add_argument(
        "--server-cpus",
        default=SERVER_CPUS,
        help=f"CPUs each server is pinned to with taskset (default {SERVER_CPUS}; '' leaves servers "
        f"unpinned); the load generator runs on CPU {WRK_CPU}",
    )
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="write docs/benchmarks.md even for a --quick or --only run (a full run always does)",
    )
    a = p.parse_args(argv)
    quick = a.quick
    a.loadgen = a.loadgen or ("wrk" if a.perf else "inferd")
    a.models = a.models or (["digits"] if quick and not a.perf else list(models.MODELS))
    a.instances = a.instances or ([1] if quick else [1, 32])
    a.connections = a.connections or ([1, 64] if quick else [1, 8, 64])
    a.duration = a.duration or ((2 if a.perf else 3) if quick else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if quick else 2)
    a.settle = a.settle if a.settle is not None else (0 if quick else 6)
    if a.settle < 0:
        p.error(f"--settle must be >= 0 seconds, got {a.settle:g}")
    a.repeats = a.repeats or (1 if quick else 3)
    a.bound_seconds = a.bound_seconds or (1 if quick else 3)
    if quick and a.perf:
        a.idle_wait = min(a.idle_wait, 0.3)
    a.command = " ".join(["python -m bench.run", *(sys.argv[1:] if argv is None else argv)])
    return a


def full_plan(args: argparse.Namespace, servers: dict[str, Server]) -> list[Session]:
    """Every selected server variant x every model, each with every (instances, connections);
    a server's extra variants only where ``--only`` names them."""

    def selected(name: str, variant: str, extra: bool) -> bool:
        if args.only is not None and f"{name}:{variant}" in args.only:
            return True
        return not extra and (args.only is None or name in args.only)

    scenarios = tuple((n, c) for n in args.instances for c in args.connections)
    return [
        Session(server, variant, model, scenarios)
        for model in args.models
        for name, server in servers.items()
        for variant in server.variants
        if selected(name, variant, variant in server.extra_variants)
    ]


def in_process_bounds(
    args: argparse.Namespace, model_files: dict[str, Path], plan: list[Session]
) -> list[Row]:
    """onnxruntime alone and the full request path in this process, for every (model, instances)
    in the plan; pinned to the servers' CPUs with one onnxruntime thread when servers are pinned."""
    pairs = sorted({(s.model, n) for s in plan for n, _ in s.scenarios})
    cpus = {int(c) for c in args.server_cpus.split(",") if c} if args.server_cpus else None
    before = os.sched_getaffinity(0)
    out: list[Row] = []
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        for m, n in pairs:
            b = bounds.measure(
                model_files[m], models.instances(m, n), args.bound_seconds, threads=len(cpus or ())
            )
            out.append({"model": m, "instances": n, "cpus": args.server_cpus or "all", **b})
            log(
                f"  {m} n={n}: ort {b['ort_pred_per_s']:.0f} pred/s, "
                f"full path {b['full_path_pred_per_s']:.0f} pred/s"
            )
    finally:
        os.sched_setaffinity(0, before)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_cleanup()
    started = time.monotonic()
    servers = all_servers()
    unknown = [o for o in args.only or [] if o.split(":")[0] not in servers]
    if unknown:
        print(f"unknown server(s) {unknown}; known: {sorted(servers)}", file=sys.stderr)
        return 2
    if args.perf:
        plan = [Session(servers[n], v, m, sc) for n, v, m, sc in perf.plan(servers, args.only)]
    else:
        plan = full_plan(args, servers)

    wrk = ensure_wrk()
    install_errors: dict[str, str] = {}
    venvs: dict[str, Path] = {}
    pkg_versions: dict[str, dict[str, str]] = {}
    for server in dict.fromkeys(s.server for s in plan):
        venv, err = ensure_venv(server)
        venvs[server.name] = venv
        if err:
            install_errors[server.name] = err
            log(f"INSTALL FAILED {server.name}: {err[-400:]}")
        else:
            pkg_versions[server.name] = versions(venv, server.report_packages)
    pkg_versions["bench (project venv)"] = versions(
        Path(sys.prefix), ["onnxruntime", "onnx", "scikit-learn", "skl2onnx", "orjson", "numpy"]
    )
    pkg_versions["wrk"] = {
        "wrk": subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    }

    model_files = models.build_all(WORK / "models")
    bodies: dict[tuple[str, str, str, int], Path] = {}
    for s in plan:
        for n in {n for n, _ in s.scenarios}:
            x = models.instances(s.model, n)
            # inferd bench --payload reads a .json file as a REST body (and other suffixes as arrays)
            json_body = s.server.headers(x, s.variant).get("Content-Type") == "application/json"
            path = WORK / "bodies" / f"{s.key}-{s.model}-{n}.{'json' if json_body else 'bin'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(s.server.body(x, s.variant))
            bodies[(s.server.name, s.variant, s.model, n)] = path

    log("in-process bounds")
    bound_rows = in_process_bounds(args, model_files, plan)

    raw: list[Row] = []
    for s in plan:
        if s.server.name in install_errors:
            error = "install failed: " + install_errors[s.server.name][-1500:]
            raw += [
                {"server": s.server.name, "variant": s.variant, "model": s.model, "round": 0,
                 "instances": n, "connections": c, "error": error}
                for n, c in s.scenarios
            ]  # fmt: skip
    runnable = [s for s in plan if s.server.name not in install_errors]
    try:
        for rnd in range(args.repeats):
            for s in runnable:  # A, B, C, A, B, C...: each round visits every session
                log(f"round {rnd + 1}/{args.repeats} {s.model}: {s.key}")
                raw += session(args, wrk, s, venvs[s.server.name], model_files[s.model], rnd, bodies)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        procs.stop_all()

    settings = ("quick", "perf", "only", "models", "instances", "connections", "duration", "warmup", "settle",
                "repeats", "idle_wait", "bound_seconds", "server_cpus")  # fmt: skip
    results: dict[str, Any] = {
        "command": args.command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in settings},
        "wrk_cpu": WRK_CPU,
        "server_cpus": args.server_cpus,
        "loadgen": args.loadgen,
        "elapsed_s": round(time.monotonic() - started),
        "versions": pkg_versions,
        "install_errors": install_errors,
        "bounds": bound_rows,
        "rows": aggregate(raw),
        "runs": [{k: v for k, v in r.items() if k != "wrk"} for r in raw],
    }
    to_docs = (not args.quick and args.only is None) or args.write_docs
    out = BENCH / "results" if to_docs else WORK / "results"
    md_path = ROOT / "docs" / "benchmarks.md" if to_docs else out / "benchmarks.md"
    out.mkdir(parents=True, exist_ok=True)
    if args.perf:
        json_path = out / "perf.json"
        json_path.write_text(json.dumps(rounded(results), indent=1) + "\n")
        if not md_path.exists():
            md_path.write_text("# Benchmarks\n")
        report.replace_section(md_path, perf.section(results), first=True)
        log(f"wrote {json_path.relative_to(ROOT)} and the perf section of {md_path.relative_to(ROOT)}")
        print("\n".join(perf.target_lines(results)))
        return 0
    json_path = out / "latest.json"
    png_path = ROOT / "docs" / "benchmarks.png" if to_docs else out / "benchmarks.png"
    json_path.write_text(json.dumps(rounded(results), indent=1) + "\n")
    plot_error = report.plot(results, json_path, png_path, VENVS / "plot")
    if plot_error:
        log(f"plot failed: {plot_error}")
    report.write(md_path, results, png_path.name if not plot_error else None)
    log(
        f"wrote {json_path.relative_to(ROOT)}, {md_path.relative_to(ROOT)}, {png_path.relative_to(ROOT)} "
        f"in {results['elapsed_s'] / 60:.1f} min"
    )
    print(report.headline(results))
    return 0


def rounded(o: Any) -> Any:
    """Floats to 4 significant digits, so the JSON stays small and diffs stay readable."""
    if isinstance(o, float):
        return float(f"{o:.4g}")
    if isinstance(o, dict):
        return {k: rounded(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [rounded(v) for v in o]
    return o


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        procs.stop_all()
        sys.exit(1)
