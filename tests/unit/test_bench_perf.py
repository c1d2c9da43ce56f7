"""The --perf report of bench/ (issue 17's targets): each verdict follows from the rows it names,
a missing row is "not measured" rather than a verdict, and the docs section it writes replaces
itself in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import perf, report


def row(server: str, variant: str, model: str, n: int, c: int, **numbers: float) -> dict[str, Any]:
    base = {"req_per_s": 1000.0, "pred_per_s": 1000.0 * n, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}
    return {
        "server": server,
        "variant": variant,
        "model": model,
        "instances": n,
        "connections": c,
        **base,
        **numbers,
    }


def results(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rows": rows,
        "bounds": [{"model": "cnn", "instances": 32, "ort_pred_per_s": 10_000.0, "ort_calls_per_s": 312.5,
                    "ort_us_per_call": 3200.0}],
        "machine": {"nproc": 2, "cpu": "test", "python": "3.11"},
        "settings": {"warmup": 1, "duration": 2, "repeats": 1},
        "command": "python -m bench.run --perf",
        "date": "2026-12-03T00:00:00+00:00",
        "elapsed_s": 60,
        "server_cpus": "0",
        "wrk_cpu": "1",
        "loadgen": "wrk",
        "install_errors": {},
    }  # fmt: skip


def verdicts(res: dict[str, Any]) -> dict[str, tuple[str, bool | None]]:
    return {target: (measured, ok) for target, measured, ok in perf.targets(res)}


def test_each_target_is_judged_from_its_own_rows_and_a_missing_row_is_not_measured() -> None:
    res = results([
        row("inferd", "default", "digits", 1, 64, req_per_s=16_000, cpu_us_per_req=70),
        row("inferd", "default", "digits", 1, 1, p50_ms=0.25, cpu_us_per_req=130, idle_mem_mib=60),
        row("asgi-floor", "default", "digits", 1, 64, req_per_s=17_000, cpu_us_per_req=60),
        row("asgi-floor", "default", "digits", 1, 1, cpu_us_per_req=100),
        row("fastapi", "untyped", "digits", 1, 64, req_per_s=3_000),
        row("fastapi", "untyped", "digits", 1, 1, idle_mem_mib=50),
        row("inferd", "v2-binary-batching", "cnn", 32, 64, pred_per_s=9_000),
        row("inferd", "batching", "cnn", 1, 64, req_per_s=1_900),
        row("inferd", "default", "cnn", 1, 64, req_per_s=1_000),
    ])  # fmt: skip
    got = verdicts(res)
    assert got["digits, TF Serving JSON, c=64, default settings: at least 15,000 req/s on one core"] == (
        "16,000 req/s",
        True,
    )
    assert got["digits, TF Serving JSON, c=64: at least 5x the hand-written (untyped) endpoint"][1] is True
    assert got["digits, TF Serving JSON, c=64: at least 90% of the bare uvicorn endpoint"] == (
        "94% (17,000 req/s)",
        True,
    )
    assert got["digits, TF Serving JSON, c=1: p50 at most 0.20 ms"] == ("0.250 ms", False)
    cpu = "digits, TF Serving JSON, c={}: inferd's CPU per request at most 1.2x the bare uvicorn endpoint's"
    assert got[cpu.format(64)] == ("70 vs 60 us: 1.17x", True)
    assert got[cpu.format(1)] == ("130 vs 100 us: 1.30x", False)
    cnn = (
        "cnn, V2 binary, 32 instances, c=64, batching on: at least 85% of onnxruntime's in-process "
        "throughput on the same core"
    )
    assert got[cnn] == ("9,000 vs 10,000 pred/s: 90%", True)
    assert got["cnn, TF Serving JSON, 1 instance, c=64: batching at least 2x unbatched"][1] is False
    assert got["idle memory after load: inferd at most 1.5x the hand-written (untyped) endpoint's"][1] is True
    # V2 JSON, V2 binary and gRPC rows were not run: no verdict either way.
    assert got["digits, V2 JSON, c=1: p50 at most 0.20 ms"] == ("not measured", None)
    grpc = "digits, TF Serving gRPC: at least as fast as TF Serving JSON (c=64 req/s, c=1 p50)"
    assert got[grpc] == ("not measured", None)


def test_the_section_goes_before_the_first_heading_once_and_then_replaces_itself(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## Headline\n\nold text\n")
    res = results([row("inferd", "default", "digits", 1, 64, req_per_s=16_000, cpu_us_per_req=70)])
    report.replace_section(doc, perf.section(res), first=True)
    text = doc.read_text()
    assert text.index(perf.START) < text.index("## Headline") < text.index("old text")
    assert "| **inferd, default** | TF Serving JSON | 16,000 |" in text
    res["rows"][0]["req_per_s"] = 12_000
    report.replace_section(doc, perf.section(res), first=True)
    again = doc.read_text()
    assert again.count(perf.START) == 1
    assert "| **inferd, default** | TF Serving JSON | 12,000 |" in again
    assert "16,000" not in again
