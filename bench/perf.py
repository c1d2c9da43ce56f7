"""Issue 17's benchmark: inferd's per-core speed against bare endpoints, side by side in one run.

``python -m bench.run --perf`` runs exactly these rows, each server pinned to CPU 0 and the load
generator (``wrk -t1``; ``inferd bench`` for gRPC) to CPU 1:

- digits, 1 instance per request, at 1 and 64 connections, TF Serving JSON: the bare granian RSGI
  and uvicorn ASGI endpoints (the floors), inferd with default settings and with batching on, and
  the hand-written FastAPI endpoint with an untyped and a typed (pydantic) body, both with one
  onnxruntime thread; inferd again over V2 JSON, V2 binary tensors and TF Serving's gRPC;
- cnn, 32 instances per request over V2 binary at 64 connections, inferd unbatched and batched,
  against onnxruntime's in-process throughput on the same core (one thread);
- cnn, 1 instance, TF Serving JSON at 64 connections, inferd unbatched and batched.

Every row reports CPU per request (CPU-seconds of the server's process tree over the requests it
answered) and its ratio to the bare uvicorn endpoint's in the same scenario. ``section`` renders
the tables and the targets (target, measured, met or not) as the ``perf`` section of
docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

Row = dict[str, Any]

DIGITS = ((1, 1), (1, 64))  # (instances, connections)
PLAN: tuple[tuple[str, str, str, tuple[tuple[int, int], ...]], ...] = (
    ("granian-floor", "default", "digits", DIGITS),
    ("asgi-floor", "default", "digits", DIGITS),
    ("inferd", "default", "digits", DIGITS),
    ("inferd", "batching", "digits", DIGITS),
    ("fastapi", "untyped", "digits", DIGITS),
    ("fastapi", "typed", "digits", DIGITS),
    ("inferd", "v2-json", "digits", DIGITS),
    ("inferd", "v2-binary", "digits", DIGITS),
    ("inferd", "grpc", "digits", DIGITS),
    ("inferd", "v2-binary", "cnn", ((32, 64),)),
    ("inferd", "v2-binary-batching", "cnn", ((32, 64),)),
    ("inferd", "default", "cnn", ((1, 64),)),
    ("inferd", "batching", "cnn", ((1, 64),)),
)
"""(server, variant, model, scenarios) of every session the preset runs, in the order of a round."""

LABELS = {
    ("granian-floor", "default"): "bare granian RSGI endpoint",
    ("asgi-floor", "default"): "bare uvicorn ASGI endpoint",
    ("inferd", "default"): "inferd, default",
    ("inferd", "batching"): "inferd, batching on",
    ("inferd", "v2-json"): "inferd, V2 JSON",
    ("inferd", "v2-binary"): "inferd, V2 binary",
    ("inferd", "v2-binary-batching"): "inferd, V2 binary, batching on",
    ("inferd", "grpc"): "inferd, TF Serving gRPC",
    ("fastapi", "untyped"): "hand-written FastAPI (untyped body, 1 onnxruntime thread)",
    ("fastapi", "typed"): "hand-written FastAPI (pydantic body, 1 onnxruntime thread)",
}
WIRES = {
    "v2-json": "V2 JSON",
    "v2-binary": "V2 binary",
    "v2-binary-batching": "V2 binary",
    "grpc": "TF Serving gRPC",
}
FLOOR = ("asgi-floor", "default")
START = "<!-- perf: written by python -m bench.run --perf -->"
END = "<!-- /perf -->"


def plan(
    servers: Iterable[str], only: list[str] | None = None
) -> list[tuple[str, str, str, tuple[tuple[int, int], ...]]]:
    """The sessions of ``PLAN`` whose server is known, narrowed by ``--only`` (NAME or
    NAME:variant) when given."""
    known = set(servers)
    return [p for p in PLAN if p[0] in known and (only is None or p[0] in only or f"{p[0]}:{p[1]}" in only)]


def label(server: str, variant: str) -> str:
    return LABELS.get((server, variant), f"{server} ({variant})")


def find(rows: list[Row], server: str, variant: str, model: str, n: int, c: int) -> Row | None:
    """The measured row of that session and scenario, or None when it failed or was not run."""
    for r in rows:
        key = (r["server"], r["variant"], r["model"], r["instances"], r["connections"])
        if key == (server, variant, model, n, c) and r.get("req_per_s"):
            return r
    return None


def _num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _bound(results: dict[str, Any], model: str, n: int) -> Row | None:
    return next((b for b in results["bounds"] if b["model"] == model and b["instances"] == n), None)


Verdict = tuple[str, str, bool | None]
"""(target, what was measured, met; None when a row or a number it needs is missing)."""


def _check(target: str, needed: tuple[Row | None, ...], keys: tuple[str, ...], judge: Judge) -> Verdict:
    """``judge`` the rows in ``needed`` when each is there with every one of ``keys`` set."""
    rows = [r for r in needed if r is not None and all(r.get(k) for k in keys)]
    if len(rows) < len(needed):
        return target, "not measured", None
    measured, ok = judge(*rows)
    return target, measured, ok


Judge = Callable[..., tuple[str, bool]]


def targets(results: dict[str, Any]) -> list[Verdict]:
    """Issue 17's targets against this run, in the issue's order."""
    rows = results["rows"]

    def digits(variant: str, c: int, server: str = "inferd") -> Row | None:
        return find(rows, server, variant, "digits", 1, c)

    rps, p50, cpu, mem = ("req_per_s",), ("p50_ms",), ("cpu_us_per_req",), ("idle_mem_mib",)
    floor64, floor1 = digits("default", 64, "asgi-floor"), digits("default", 1, "asgi-floor")
    hand64 = digits("untyped", 64, "fastapi")
    out: list[Verdict] = []
    for variant, name in (("default", "TF Serving JSON"), ("v2-json", "V2 JSON")):
        r64, r1 = digits(variant, 64), digits(variant, 1)
        out += [
            _check(
                f"digits, {name}, c=64, default settings: at least 15,000 req/s on one core",
                (r64,), rps,
                lambda r: (f"{r['req_per_s']:,.0f} req/s", r["req_per_s"] >= 15_000),
            ),
            _check(
                f"digits, {name}, c=64: at least 5x the hand-written (untyped) endpoint",
                (r64, hand64), rps,
                lambda r, h: (
                    f"{_ratio(r['req_per_s'], h['req_per_s'])} ({h['req_per_s']:,.0f} req/s)",
                    r["req_per_s"] >= 5 * h["req_per_s"],
                ),
            ),
            _check(
                f"digits, {name}, c=64: at least 90% of the bare uvicorn endpoint",
                (r64, floor64), rps,
                lambda r, f: (
                    f"{r['req_per_s'] / f['req_per_s']:.0%} ({f['req_per_s']:,.0f} req/s)",
                    r["req_per_s"] >= 0.9 * f["req_per_s"],
                ),
            ),
            _check(
                f"digits, {name}, c=1: p50 at most 0.20 ms",
                (r1,), p50,
                lambda r: (f"{r['p50_ms']:.3f} ms", r["p50_ms"] <= 0.20),
            ),
        ]  # fmt: skip
    tfs64, tfs1 = digits("default", 64), digits("default", 1)
    for variant in ("v2-binary", "grpc"):
        out.append(
            _check(
                f"digits, {WIRES[variant]}: at least as fast as TF Serving JSON (c=64 req/s, c=1 p50)",
                (digits(variant, 64), digits(variant, 1), tfs64, tfs1), rps + p50,
                lambda r64, r1, t64, t1: (
                    f"c=64 {r64['req_per_s']:,.0f} vs {t64['req_per_s']:,.0f} req/s; "
                    f"c=1 p50 {r1['p50_ms']:.3f} vs {t1['p50_ms']:.3f} ms",
                    r64["req_per_s"] >= t64["req_per_s"] and r1["p50_ms"] <= t1["p50_ms"],
                ),
            )
        )  # fmt: skip
    for c, floor in ((64, floor64), (1, floor1)):
        out.append(
            _check(
                f"digits, TF Serving JSON, c={c}: inferd's CPU per request at most 1.2x the bare "
                "uvicorn endpoint's",
                (digits("default", c), floor), cpu,
                lambda r, f: (
                    f"{r['cpu_us_per_req']:.0f} vs {f['cpu_us_per_req']:.0f} us: "
                    f"{_ratio(r['cpu_us_per_req'], f['cpu_us_per_req'])}",
                    r["cpu_us_per_req"] <= 1.2 * f["cpu_us_per_req"],
                ),
            )
        )  # fmt: skip
    out.append(
        _check(
            "cnn, V2 binary, 32 instances, c=64, batching on: at least 85% of onnxruntime's "
            "in-process throughput on the same core",
            (find(rows, "inferd", "v2-binary-batching", "cnn", 32, 64), _bound(results, "cnn", 32)),
            (),
            lambda r, b: (
                f"{r['pred_per_s']:,.0f} vs {b['ort_pred_per_s']:,.0f} pred/s: "
                f"{r['pred_per_s'] / b['ort_pred_per_s']:.0%}",
                r["pred_per_s"] >= 0.85 * b["ort_pred_per_s"],
            ),
        )
    )  # fmt: skip
    out.append(
        _check(
            "cnn, TF Serving JSON, 1 instance, c=64: batching at least 2x unbatched",
            (find(rows, "inferd", "batching", "cnn", 1, 64), find(rows, "inferd", "default", "cnn", 1, 64)),
            rps,
            lambda on, off: (
                f"{on['req_per_s']:,.0f} vs {off['req_per_s']:,.0f} req/s: "
                f"{_ratio(on['req_per_s'], off['req_per_s'])}",
                on["req_per_s"] >= 2 * off["req_per_s"],
            ),
        )
    )  # fmt: skip
    out.append(
        _check(
            "idle memory after load: inferd at most 1.5x the hand-written (untyped) endpoint's",
            (digits("default", 1), digits("untyped", 1, "fastapi")), mem,
            lambda r, h: (
                f"{r['idle_mem_mib']:.0f} vs {h['idle_mem_mib']:.0f} MiB: "
                f"{_ratio(r['idle_mem_mib'], h['idle_mem_mib'])}",
                r["idle_mem_mib"] <= 1.5 * h["idle_mem_mib"],
            ),
        )
    )  # fmt: skip
    return out


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**not met**")


def target_lines(results: dict[str, Any]) -> list[str]:
    """The targets as plain lines, for the console."""
    return [f"{_verdict(ok).strip('*'):9s} {target}: {measured}" for target, measured, ok in targets(results)]


def section(results: dict[str, Any]) -> str:
    """The ``perf`` section of docs/benchmarks.md: how the run was made, the digits table, the
    cnn table and the targets, all from ``results`` (one run of ``python -m bench.run --perf``)."""
    rows, m, s = results["rows"], results["machine"], results["settings"]
    settle = s.get("settle", 0)
    pause = f"a {settle:g} s pause (past the keep-alive of what the warm-up dropped), " if settle else ""
    pinned = (
        f"each server pinned to CPU {results['server_cpus']} and the load generator to CPU "
        f"{results['wrk_cpu']}"
        if results["server_cpus"]
        else f"servers not pinned; the load generator on CPU {results['wrk_cpu']}"
    )
    http_gen = "`wrk -t1` (bench/wrk_post_headers.lua)" if results["loadgen"] == "wrk" else "`inferd bench`"
    out = [
        START,
        "## Per-core speed against bare endpoints (issue 17)",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- date: {results['date']}; the run took {results['elapsed_s'] / 60:.0f} minutes; machine: "
        f"{m['nproc']} CPUs ({m['cpu']}), Python {m['python']}",
        f"- {pinned} (`taskset`). HTTP rows: {http_gen}; gRPC rows: `inferd bench --protocol=grpc` "
        "(one process), so they also carry that generator's own cost.",
        f"- each row: {s['warmup']:g} s warm-up, {pause}{s['duration']:g} s measured; "
        f"{s['repeats']} round(s), every server started afresh per round and model, medians over rounds.",
        "- CPU/req: CPU-seconds (user + system) of the server's whole process tree over the requests it "
        "answered, in microseconds; `vs uvicorn`: that over the bare uvicorn endpoint's in the same "
        "scenario. The floors and the hand-written endpoint run onnxruntime with one intra-op thread; "
        "inferd runs with its default settings.",
        "",
        "### digits, 1 instance per request",
        "",
        "| server | wire | c=64 req/s | c=64 p99 ms | c=64 CPU/req us | vs uvicorn | c=1 req/s | c=1 p50 ms "
        "| c=1 CPU/req us | vs uvicorn | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    floor = {c: find(rows, *FLOOR, "digits", 1, c) for c in (1, 64)}
    for server, variant, model, _ in PLAN:
        if model != "digits":
            continue
        r64, r1 = find(rows, server, variant, "digits", 1, 64), find(rows, server, variant, "digits", 1, 1)
        if r64 is None and r1 is None:
            out.append(
                f"| {label(server, variant)} | {WIRES.get(variant, 'TF Serving JSON')} | failed |" + " |" * 8
            )
            continue
        cells = []
        for c, r in ((64, r64), (1, r1)):
            f = floor[c]
            cpu = r.get("cpu_us_per_req") if r else None
            first = _num(r["p99_ms"], 2) if r and c == 64 else _num(r["p50_ms"], 3) if r else "-"
            cells += [
                _num(r["req_per_s"]) if r else "-",
                first,
                _num(cpu),
                _ratio(cpu, f.get("cpu_us_per_req") if f else None),
            ]
        errors = sum(r["errors"] or 0 for r in (r64, r1) if r)
        name = label(server, variant)
        out.append(
            f"| {'**' + name + '**' if server == 'inferd' else name} | "
            f"{WIRES.get(variant, 'TF Serving JSON')} | " + " | ".join(cells) + f" | {errors:,.0f} |"
        )
    out += [
        "",
        "### cnn (float32 [N, 1, 28, 28])",
        "",
        "| server | wire | instances | c | req/s | pred/s | p50 ms | p99 ms | CPU/req us | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for server, variant, model, scenarios in PLAN:
        if model != "cnn":
            continue
        for n, c in scenarios:
            r = find(rows, server, variant, "cnn", n, c)
            head = f"| {label(server, variant)} | {WIRES.get(variant, 'TF Serving JSON')} | {n} | {c} | "
            if r is None:
                out.append(head + "failed |" + " |" * 5)
                continue
            out.append(
                head + f"{_num(r['req_per_s'])} | {_num(r['pred_per_s'])} | {_num(r['p50_ms'], 2)} | "
                f"{_num(r['p99_ms'], 2)} | {_num(r.get('cpu_us_per_req'))} | {_num(r['errors'])} |"
            )
    bound = _bound(results, "cnn", 32)
    if bound:
        out.append(
            f"| onnxruntime in process, one thread on the same core | - | 32 | - | "
            f"{_num(bound['ort_calls_per_s'])} | {_num(bound['ort_pred_per_s'])} | "
            f"{_num(bound['ort_us_per_call'] / 1000, 2)} | - | - | - |"
        )
    failures = sorted(
        {
            f"{label(r['server'], r['variant'])}: {f.splitlines()[0][:200]}"
            for r in rows
            for f in r.get("failures", [])
        }
    )
    if results.get("install_errors"):
        failures += [f"{name}: install failed" for name in results["install_errors"]]
    out += [
        "",
        "### Targets, checked against this run",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
        *(f"| {target} | {measured} | {_verdict(ok)} |" for target, measured, ok in targets(results)),
        "",
        "Failures: " + ("; ".join(failures) if failures else "none."),
        "",
        "Raw numbers: `bench/results/perf.json`.",
        END,
    ]
    return "\n".join(out)
