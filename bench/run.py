#!/usr/bin/env python
"""inferd's benchmark: inferd against the servers people use instead, driven by the same load
generator (``inferd bench`` by default, ``--loadgen wrk`` for wrk).

    .venv/bin/python bench/run.py                  # the full run; writes docs/benchmarks.md
    .venv/bin/python bench/run.py --quick          # smoke test (digits, 1 instance, c=1 and 64)
    .venv/bin/python bench/run.py --quick --only inferd fastapi

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
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import bounds
import models
import procs
import report
from servers import Context, Server, all_servers

VENVS = BENCH / ".venvs"
WORK = BENCH / ".work"
WRK_CPU = "1"  # the load generator runs pinned to this CPU (taskset); servers are not pinned


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
            tail = "\n".join(l for l in done.stderr.splitlines() if "is ignored" not in l)[-1500:]
            return venv, f"pip install {wanted} failed: {tail}"
    except Exception as exc:
        return venv, f"installing {server.name} failed: {exc}"
    marker.write_text(wanted)
    return venv, None


def versions(venv: Path, names: list[str]) -> dict[str, str]:
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
        return json.loads(done.stdout)
    except ValueError:
        return {n: "?" for n in names}


# ---------------------------------------------------------------- requests and wrk


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_wrk(wrk: str, url: str, body_file: Path, connections: int, seconds: float) -> dict:
    cmd = [
        "taskset",
        "-c",
        WRK_CPU,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "wrk_post.lua"),
        url,
        "--",
        str(body_file),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON ") :])
    raise RuntimeError(
        f"wrk printed no result (rc {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}"
    )


def run_inferd_bench(url: str, body_file: Path, connections: int, seconds: float) -> dict:
    """``inferd bench`` (closed loop, one process) on the same URL and body as wrk would send,
    pinned like wrk; its JSON turned into the fields run_wrk returns."""
    parts = urllib.parse.urlsplit(url)
    cmd = [
        "taskset", "-c", WRK_CPU, sys.executable, "-m", "inferd", "bench",
        f"{parts.scheme}://{parts.netloc}", "--model=bench", f"--path={parts.path or '/'}",
        f"--payload={body_file}", f"--concurrency={connections}", f"--duration={seconds}",
        "--warmup=0", "--timeout=10", "--metrics-url=", "--json=-",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"inferd bench failed (rc {done.returncode}): {done.stderr[-800:]}")
    (step,) = json.loads(done.stdout)["steps"]
    errors = step["errors"]
    http = {k: v for k, v in errors.items() if k.isdigit()}
    latency = {k: (v if v is not None else float("nan")) * 1000 for k, v in step["latency_ms"].items()}
    return {
        "requests": step["requests"],
        "duration_us": int(seconds * 1e6),
        "non2xx": sum(http.values()),
        "statuses": http,
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


def run_load(
    args: argparse.Namespace, wrk: str, url: str, body_file: Path, connections: int, seconds: float
) -> dict:
    if args.loadgen == "wrk":
        return run_wrk(wrk, url, body_file, connections, seconds)
    return run_inferd_bench(url, body_file, connections, seconds)


# ---------------------------------------------------------------- one server session


def start(server: Server, ctx: Context, cleanup: list[Path]) -> tuple[procs.ServerProcess, object, float]:
    port = procs.free_port()
    launch = server.launch(ctx, port)
    cleanup += launch.cleanup
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{ctx.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(launch.env)
    t0 = time.monotonic()
    proc = procs.ServerProcess(launch.cmd, launch.cwd, env, ctx.work / "server.log")
    probe = server.body(models.instances(ctx.model, 1))
    last = "no answer yet"
    while time.monotonic() - t0 < launch.startup_timeout:
        if not proc.alive():
            raise RuntimeError(
                f"exited with {proc.proc.returncode} before answering (log {proc.log_path}):\n{proc.log_tail(8)}"
            )
        if launch.not_ready is not None:
            why = launch.not_ready()
            if why is not None:
                last = why
                time.sleep(0.5)
                continue
        try:
            status, answer = post(launch.url, probe, timeout=5)
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


def check_answers(server: Server, url: str, model: str, model_file: Path, n: int) -> None:
    import onnxruntime as ort

    x = models.instances(model, n)
    want = ort.InferenceSession(str(model_file)).run(None, {"input": x})[0]
    status, answer = post(url, server.body(x))
    if status != 200:
        raise RuntimeError(f"check with {n} instances: HTTP {status}: {answer[:300]!r}")
    got = server.predictions(answer).reshape(want.shape)
    if not np.allclose(got, want, atol=1e-4):
        raise RuntimeError(
            f"check with {n} instances: answers differ from onnxruntime's (max diff {abs(got - want).max()})"
        )


def session(
    args,
    wrk: str,
    server: Server,
    variant: str,
    venv: Path,
    model: str,
    model_file: Path,
    scenarios: list[tuple[int, int]],
    rnd: int,
    bodies: dict,
) -> list[dict]:
    key = f"{server.name}-{variant}"
    work = WORK / "runs" / f"{key}-{model}-r{rnd}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx = Context(ROOT, work, venv, model, model_file.parents[2], model_file, variant)
    base = {"server": server.name, "variant": variant, "model": model, "round": rnd}
    rows = []
    proc = None
    cleanup: list[Path] = []
    try:
        proc, launch, startup_s = start(server, ctx, cleanup)
        for n in sorted({n for n, _ in scenarios}):
            check_answers(server, launch.url, model, model_file, n)
        log(
            f"  {key} {model} up in {startup_s:.1f} s, answers checked; tree {len(proc.pids())} processes, "
            f"{procs.memory_bytes(proc.pids()) / 2**20:.0f} MiB"
        )
        for n, c in scenarios:
            row = {**base, "instances": n, "connections": c, "startup_s": startup_s}
            try:
                body = bodies[(server.name, model, n)]
                if args.warmup > 0:
                    run_load(args, wrk, launch.url, body, c, args.warmup)
                pids = proc.pids()
                cpu0 = procs.cpu_seconds(pids)
                with procs.MemorySampler(proc) as mem:
                    res = run_load(args, wrk, launch.url, body, c, args.duration)
                cpu1 = procs.cpu_seconds(proc.pids() | pids)
                time.sleep(args.idle_wait)
                idle = procs.memory_bytes(proc.pids())
                secs = res["duration_us"] / 1e6
                ok = res["requests"] - res["non2xx"]
                errors = (
                    res["non2xx"]
                    + res["connect_errors"]
                    + res["read_errors"]
                    + res["write_errors"]
                    + res["timeouts"]
                )
                preds = ok * n
                row |= {
                    "req_per_s": ok / secs,
                    "pred_per_s": preds / secs,
                    "p50_ms": res["p50_us"] / 1000,
                    "p99_ms": res["p99_us"] / 1000,
                    "errors": errors,
                    "requests": res["requests"],
                    "cpu_s_per_1k_pred": (cpu1 - cpu0) / preds * 1000 if preds else None,
                    "statuses": res["statuses"],
                    "peak_mem_mib": mem.peak / 2**20,
                    "idle_mem_mib": idle / 2**20,
                    "wrk": res,
                }
                log(
                    f"  {key:22s} {model:6s} n={n:<2d} c={c:<2d} {row['req_per_s']:8.0f} req/s "
                    f"{row['pred_per_s']:9.0f} pred/s p50 {row['p50_ms']:7.2f} p99 {row['p99_ms']:8.2f} ms "
                    f"err {errors} cpu/1k {row['cpu_s_per_1k_pred'] or 0:.3f} s peak {row['peak_mem_mib']:.0f} MiB"
                )
                if not proc.alive():
                    raise RuntimeError(f"server died: {proc.log_tail()}")
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"  {key} {model} n={n} c={c}: FAILED {row['error'][:300]}")
            rows.append(row)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        log(f"  {key} {model}: FAILED {msg[:400]}")
        rows = [{**base, "instances": n, "connections": c, "error": msg[:2000]} for n, c in scenarios]
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
    "peak_mem_mib",
    "idle_mem_mib",
    "startup_s",
)


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(
            (r["server"], r["variant"], r["model"], r["instances"], r["connections"]), []
        ).append(r)
    out = []
    for (s, v, m, n, c), rs in groups.items():
        good = [r for r in rs if "error" not in r]
        agg = {
            "server": s,
            "variant": v,
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
        default="inferd",
        help="load generator: inferd bench (default) or wrk with bench/wrk_post.lua",
    )
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="write docs/benchmarks.md even for a --quick or --only run (a full run always does)",
    )
    a = p.parse_args(argv)
    quick = a.quick
    a.models = a.models or (["digits"] if quick else list(models.MODELS))
    a.instances = a.instances or ([1] if quick else [1, 32])
    a.connections = a.connections or ([1, 64] if quick else [1, 8, 64])
    a.duration = a.duration or (3 if quick else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if quick else 2)
    a.repeats = a.repeats or (1 if quick else 3)
    a.bound_seconds = a.bound_seconds or (1 if quick else 3)
    a.command = (
        " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]]) if argv is None else "bench/run.py"
    )
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_cleanup()
    started = time.monotonic()
    servers = all_servers()
    selected: list[tuple[Server, str]] = []
    for name, server in servers.items():
        for variant in server.variants:
            if args.only is None or name in args.only or f"{name}:{variant}" in args.only:
                selected.append((server, variant))
    unknown = [o for o in args.only or [] if o.split(":")[0] not in servers]
    if unknown:
        print(f"unknown server(s) {unknown}; known: {sorted(servers)}", file=sys.stderr)
        return 2

    wrk = ensure_wrk()
    install_errors: dict[str, str] = {}
    venvs: dict[str, Path] = {}
    pkg_versions: dict[str, dict[str, str]] = {}
    for server in dict.fromkeys(s for s, _ in selected):
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
    scenarios = [(n, c) for n in args.instances for c in args.connections]

    bodies: dict[tuple, Path] = {}
    for server in dict.fromkeys(s for s, _ in selected):
        for m in args.models:
            for n in args.instances:
                path = WORK / "bodies" / f"{server.name}-{m}-{n}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(server.body(models.instances(m, n)))
                bodies[(server.name, m, n)] = path

    log("in-process bounds")
    bound_rows = []
    for m in args.models:
        for n in args.instances:
            b = bounds.measure(model_files[m], models.instances(m, n), args.bound_seconds)
            bound_rows.append({"model": m, "instances": n, **b})
            log(
                f"  {m} n={n}: ort {b['ort_pred_per_s']:.0f} pred/s, full path {b['full_path_pred_per_s']:.0f} pred/s"
            )

    raw: list[dict] = []
    for server, variant in selected:
        if server.name in install_errors:
            for m in args.models:
                raw += [
                    {
                        "server": server.name,
                        "variant": variant,
                        "model": m,
                        "round": 0,
                        "instances": n,
                        "connections": c,
                        "error": "install failed: " + install_errors[server.name][-1500:],
                    }
                    for n, c in scenarios
                ]
    runnable = [(s, v) for s, v in selected if s.name not in install_errors]
    try:
        for rnd in range(args.repeats):
            for m in args.models:
                for server, variant in runnable:  # A, B, C, A, B, C...: each round visits every server
                    log(f"round {rnd + 1}/{args.repeats} {m}: {server.name}-{variant}")
                    raw += session(
                        args,
                        wrk,
                        server,
                        variant,
                        venvs[server.name],
                        m,
                        model_files[m],
                        scenarios,
                        rnd,
                        bodies,
                    )
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        procs.stop_all()

    results = {
        "command": args.command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "quick",
                "only",
                "models",
                "instances",
                "connections",
                "duration",
                "warmup",
                "repeats",
                "idle_wait",
                "bound_seconds",
            )
        },
        "wrk_cpu": WRK_CPU,
        "loadgen": args.loadgen,
        "elapsed_s": round(time.monotonic() - started),
        "versions": pkg_versions,
        "install_errors": install_errors,
        "bounds": bound_rows,
        "rows": aggregate(raw),
        "runs": [{k: v for k, v in r.items() if k != "wrk"} for r in raw],
    }
    full = not args.quick and args.only is None
    if full or args.write_docs:
        json_path, md_path, png_path = (
            BENCH / "results" / "latest.json",
            ROOT / "docs" / "benchmarks.md",
            ROOT / "docs" / "benchmarks.png",
        )
    else:
        out = WORK / "results"
        json_path, md_path, png_path = out / "latest.json", out / "benchmarks.md", out / "benchmarks.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
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


def rounded(o):
    """Floats to 4 significant digits, so the JSON stays small and diffs stay readable."""
    if isinstance(o, float):
        return float(f"{o:.4g}")
    if isinstance(o, dict):
        return {k: rounded(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [rounded(v) for v in o]
    return o


def machine() -> dict:
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
