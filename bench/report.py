"""docs/benchmarks.md and the plot, from the results dict that run.py writes as JSON."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

PLOT = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

results = json.load(open(sys.argv[1]))
rows = [r for r in results["rows"] if r.get("pred_per_s")]
panels = sorted({(r["model"], r["instances"]) for r in rows})
if not panels:
    sys.exit("nothing measured")
fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
names = sorted({(r["server"], r["variant"]) for r in rows})
cmap = plt.get_cmap("tab20")
for ax, (model, n) in zip(axes[0], panels):
    for i, (s, v) in enumerate(names):
        pts = sorted((r["connections"], r["pred_per_s"], r["p99_ms"]) for r in rows
                     if (r["server"], r["variant"], r["model"], r["instances"]) == (s, v, model, n))
        if not pts:
            continue
        style = dict(lw=2.5, color="black") if s == "inferd" else dict(color=cmap(i % 20))
        ls = "--" if v == "batching" else "-"
        ax.plot([p[1] for p in pts], [p[2] for p in pts], ls, marker="o", label=f"{s} ({v})", **style)
        for c, x, y in pts:
            ax.annotate(f"c{c}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    bound = next((b for b in results["bounds"] if b["model"] == model and b["instances"] == n), None)
    if bound:
        ax.axvline(bound["full_path_pred_per_s"], color="grey", ls=":",
                   label="in-process full path (1 thread)")
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("predictions/s (median)"); ax.set_ylabel("p99 latency, ms (median)")
    ax.set_title(f"{model}, {n} instance(s) per request")
    ax.grid(True, which="both", alpha=0.3)
axes[0][-1].legend(fontsize=7, loc="best")
fig.suptitle("throughput vs p99 latency; points are connections (c1, c8, c64); lower right is better")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""


def plot(results: dict[str, Any], json_path: Path, png_path: Path, venv: Path) -> str | None:
    """Draws the plot with matplotlib from ``venv`` (installed there if missing); an error or None."""
    py = venv / "bin" / "python"
    try:
        if not py.exists():
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True, capture_output=True)
        if subprocess.run([str(py), "-c", "import matplotlib"], capture_output=True).returncode != 0:
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", "matplotlib"], check=True, capture_output=True
            )
        done = subprocess.run(
            [str(py), "-c", PLOT, str(json_path), str(png_path)], capture_output=True, text=True
        )
        return None if done.returncode == 0 else done.stderr[-800:]
    except Exception as exc:
        return str(exc)


def _f(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


VARIANT_LABELS = {"batching": "batching", "nometrics": "metrics off"}


def label(r: dict[str, Any]) -> str:
    variant = r["variant"]
    return r["server"] if variant == "default" else f"{r['server']} ({VARIANT_LABELS.get(variant, variant)})"


def _find(rows: list[dict[str, Any]], **kw: object) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def headline(results: dict[str, Any]) -> str:
    rows = [r for r in results["rows"] if r.get("pred_per_s")]
    lines = []
    for model, n in sorted({(r["model"], r["instances"]) for r in rows}):
        for c in sorted({r["connections"] for r in rows if r["model"] == model and r["instances"] == n}):
            here = [r for r in rows if r["model"] == model and r["instances"] == n and r["connections"] == c]
            ours = [r for r in here if r["server"] == "inferd"]
            others = alternatives(here)
            best = max(others, key=lambda r: r["pred_per_s"], default=None)
            parts = [f"{label(r)} {r['pred_per_s']:,.0f} pred/s p99 {r['p99_ms']:.2f} ms" for r in ours]
            if best:
                parts.append(
                    f"fastest alternative {label(best)} {best['pred_per_s']:,.0f} pred/s "
                    f"p99 {best['p99_ms']:.2f} ms"
                )
            lines.append(f"- {model}, {n} instance(s), {c} connection(s): " + "; ".join(parts))
    return "\n".join(lines)


JAVA_SERVERS = {"torchserve"}
"""Alternatives whose HTTP front end is not Python."""

FLOORS = {"asgi-floor", "granian-floor"}
"""Reference servers that are not alternatives (kept out of every "fastest alternative")."""


def alternatives(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["server"] != "inferd" and r["server"] not in FLOORS]


def targets(results: dict[str, Any]) -> list[str]:
    """Issue 3's targets, each checked against this run's medians (one line each, MET / NOT MET)."""
    rows = [r for r in results["rows"] if r.get("pred_per_s")]

    def pick(model: str, n: int, c: int, **kw: object) -> list[dict[str, Any]]:
        return [
            r
            for r in rows
            if r["model"] == model
            and r["instances"] == n
            and r["connections"] == c
            and all(r.get(k) == v for k, v in kw.items())
        ]

    def best(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
        return max(candidates, key=lambda r: r["pred_per_s"], default=None)

    def verdict(ok: bool) -> str:
        return "**MET**" if ok else "**NOT MET**"

    out = []
    here = pick("digits", 1, 64)
    ours = best([r for r in here if r["server"] == "inferd" and r["variant"] != "nometrics"])
    python = best([r for r in alternatives(here) if r["server"] not in JAVA_SERVERS])
    java = best([r for r in alternatives(here) if r["server"] in JAVA_SERVERS])
    if ours and python and java:
        ok = (
            ours["pred_per_s"] >= 4 * python["pred_per_s"]
            and ours["pred_per_s"] > java["pred_per_s"]
            and ours["p99_ms"] < min(python["p99_ms"], java["p99_ms"])
        )
        out.append(
            f"- digits, 1 instance, 64 connections: {label(ours)} {ours['pred_per_s']:,.0f} pred/s, "
            f"{_ratio(ours['pred_per_s'], python['pred_per_s'])} the fastest pure-Python alternative "
            f"({label(python)}, {python['pred_per_s']:,.0f}) and "
            f"{_ratio(ours['pred_per_s'], java['pred_per_s'])} "
            f"{label(java)}'s; p99 {ours['p99_ms']:.2f} ms vs {python['p99_ms']:.2f} and "
            f"{java['p99_ms']:.2f} ms "
            f"(target: 4×, ahead of TorchServe, lower p99 than both): {verdict(ok)}"
        )
    bound = _find(results["bounds"], model="digits", instances=1)
    here = pick("digits", 1, 1)
    ours = _find(here, server="inferd", variant="default")
    alternative = best(alternatives(here))
    floor = _find(here, server="asgi-floor")
    if bound and ours and alternative:
        floor_ms = bound["full_path_us_per_call"] / 1000
        added, theirs = ours["p50_ms"] - floor_ms, alternative["p50_ms"] - floor_ms
        out.append(
            f"- digits, 1 connection: inferd adds {added:.3f} ms (p50) over the in-process full path "
            f"({floor_ms:.3f} ms), {label(alternative)} adds {theirs:.3f} ms: {_ratio(added, theirs)} "
            f"(target: at most 0.33×): {verdict(added <= theirs / 3)}"
            + (
                f"; the bare uvicorn floor adds {floor['p50_ms'] - floor_ms:.3f} ms by itself"
                if floor
                else ""
            )
        )
    here = pick("cnn", 1, 64)
    batched = _find(here, server="inferd", variant="batching")
    unbatched = _find(here, server="inferd", variant="default")
    alternative = best(alternatives(here))
    if batched and unbatched and alternative:
        ok = batched["pred_per_s"] >= 2 * max(unbatched["pred_per_s"], alternative["pred_per_s"])
        out.append(
            f"- cnn, 1 instance, 64 connections: inferd (batching) {batched['pred_per_s']:,.0f} pred/s, "
            f"{_ratio(batched['pred_per_s'], unbatched['pred_per_s'])} inferd unbatched and "
            f"{_ratio(batched['pred_per_s'], alternative['pred_per_s'])} the best alternative "
            f"({label(alternative)}) (target: 2× both): {verdict(ok)}"
        )
    ours = _find(pick("digits", 1, 1), server="inferd", variant="default")
    fastapi = _find(pick("digits", 1, 1), server="fastapi", variant="typed")
    if ours and fastapi and ours.get("idle_mem_mib") and fastapi.get("idle_mem_mib"):
        ratio = ours["idle_mem_mib"] / fastapi["idle_mem_mib"]
        out.append(
            f"- memory: idle inferd with digits {ours['idle_mem_mib']:.0f} MiB, hand-written FastAPI "
            f"{fastapi['idle_mem_mib']:.0f} MiB: {ratio:.2f}× (target: at most 1.5×): {verdict(ratio <= 1.5)}"
        )
    here = pick("digits", 1, 64)
    on, off = (
        _find(here, server="inferd", variant="default"),
        _find(here, server="inferd", variant="nometrics"),
    )
    if on and off:
        change = on["pred_per_s"] / off["pred_per_s"] - 1
        out.append(
            f"- metrics on vs off (digits, 1 instance, 64 connections): {on['pred_per_s']:,.0f} vs "
            f"{off['pred_per_s']:,.0f} pred/s, {change:+.1%} (target: under 5% apart): "
            f"{verdict(abs(change) < 0.05)}"
        )
    return out


_SECTION = re.compile(r"^<!-- (\w+): .*?-->$.*?^<!-- /\1 -->$", re.S | re.M)


def kept_sections(path: Path) -> str:
    """The sections other scripts wrote into ``path`` between ``<!-- name: ... -->`` and
    ``<!-- /name -->`` (protocols, feature lookups), to carry over when the report is rewritten."""
    text = path.read_text() if path.exists() else ""
    return "".join(f"\n{match.group(0)}\n" for match in _SECTION.finditer(text))


def replace_section(path: Path, text: str, first: bool = False) -> None:
    """Put ``text``, one ``<!-- name: ... -->`` ... ``<!-- /name -->`` section, into ``path`` in
    place of the section of that name, or where there is none, at the end (``first``: before the
    file's first ``## `` heading)."""
    match = _SECTION.fullmatch(text.strip())
    assert match, "the text must be one whole section"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    name = re.escape(match.group(1))
    pattern = re.compile(rf"^<!-- {name}: .*?-->$.*?^<!-- /{name} -->$", re.S | re.M)
    heading = doc.find("\n## ")
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text.strip(), doc, count=1)
    elif first and heading >= 0:
        doc = doc[: heading + 1] + text.strip() + "\n\n" + doc[heading + 1 :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text.strip() + "\n"
    path.write_text(doc)


def write(path: Path, results: dict[str, Any], png_name: str | None) -> None:
    """Write the report to ``path``, keeping the sections other scripts put there."""
    path.write_text(markdown(results, png_name) + kept_sections(path))


def markdown(results: dict[str, Any], png_name: str | None) -> str:
    s, m = results["settings"], results["machine"]
    rows = results["rows"]
    wrk = results.get("loadgen", "wrk") == "wrk"
    gen = "wrk" if wrk else "inferd bench"
    out = [
        "# Benchmarks",
        "",
        "inferd against the servers people use instead, each serving the same ONNX model with "
        "onnxruntime, all driven by the same "
        + (
            "`wrk` + Lua script (`bench/wrk_post.lua`)"
            if wrk
            else "load generator, `inferd bench` ([bench.md](bench.md))"
        )
        + ". Produced by `python -m bench.run`; see [bench/README.md](../bench/README.md) for what is "
        "measured and how.",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- date: {results['date']}; the run took {results['elapsed_s'] / 60:.0f} minutes",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB, Linux {m['kernel']}, Python "
        f"{m['python']}",
        f"- load: {'wrk with 1 thread' if wrk else 'inferd bench, closed loop, 1 process'}, pinned to CPU "
        f"{results['wrk_cpu']} with `taskset`; servers are not pinned, "
        f"so they share that CPU with {gen} (on a 2-CPU machine there is no third core to keep them apart). "
        f"Each row: {s['warmup']:g} s of warm-up load, "
        + (f"a {s['settle']:g} s pause, " if s.get("settle") else "")
        + f"then {s['duration']:g} s measured; "
        f"{s['repeats']} round(s), the servers taken in turn (A, B, C, A, B, C ...), each started afresh per "
        f"round and model; the tables give medians over rounds.",
        "- models: `digits`, a scikit-learn MLPClassifier (64 -> 64 -> 10) on `load_digits`, converted with "
        "skl2onnx; `cnn`, two 3x3 conv + relu + maxpool layers and a linear layer on [N, 1, 28, 28] "
        "(fixed-seed weights). Both built at bench time.",
        "- batching variants: at most 32 per batch and 2 ms of waiting, in each server's own unit: "
        "examples for "
        "inferd and BentoML, requests for MLServer, LitServe, Ray Serve and TorchServe.",
        "- columns: `pred/s` = successful requests/s × instances per request; `vs inferd` = pred/s over "
        "inferd "
        f"(default settings) in the same scenario; p50/p99 from {gen}'s latency distribution; `errors` = "
        "non-2xx "
        "answers + socket errors + timeouts; `CPU s/1k` = CPU-seconds (user + system, the server's whole "
        "process "
        "tree) per 1,000 predictions; `peak`/`idle` = PSS of the process tree in MiB, sampled every 0.25 s "
        "under "
        f"load, and {s.get('idle_wait', 1):g} s after it; `of bound` = pred/s as a share of the in-process "
        "full path below.",
        "",
        "## Headline",
        "",
        headline(results) or "(nothing measured)",
        "",
        "## Targets (issue 3), checked against this run",
        "",
        *(targets(results) or ["(this run lacks the rows the targets need)"]),
        "",
    ]
    if png_name:
        out += [f"![throughput vs p99]({png_name})", ""]
    out += [
        "## In-process bounds",
        "",
        "One Python thread, no HTTP: `ort` is `session.run` on a ready array; `full path` is request bytes "
        "-> "
        "orjson -> numpy -> onnxruntime -> orjson bytes. What one process could reach if serving cost "
        "nothing.",
        "",
        "| model | instances | ort pred/s | full path pred/s | full path µs/request |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for b in results["bounds"]:
        out.append(
            f"| {b['model']} | {b['instances']} | {_f(b['ort_pred_per_s'])} | "
            f"{_f(b['full_path_pred_per_s'])} "
            f"| {_f(b['full_path_us_per_call'], 1)} |"
        )
    out.append("")
    for model in s["models"]:
        for n in s["instances"]:
            bound = _find(results["bounds"], model=model, instances=n)
            out += [f"## {model}, {n} instance{'s' if n > 1 else ''} per request", ""]
            for c in s["connections"]:
                here = [
                    r for r in rows if r["model"] == model and r["instances"] == n and r["connections"] == c
                ]
                if not here:
                    continue
                ref = _find(here, server="inferd", variant="default")
                ref_pps = ref.get("pred_per_s") if ref else None
                ref_p99 = ref.get("p99_ms") if ref else None
                out += [
                    f"### {c} connection{'s' if c > 1 else ''}",
                    "",
                    "| server | req/s | pred/s | vs inferd | p50 ms | p99 ms | p99 vs inferd | errors | "
                    "CPU s/1k | peak MiB | idle MiB | of bound | runs |",
                    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                    "---: |",
                ]
                here.sort(key=lambda r: -(r.get("pred_per_s") or -1))
                for r in here:
                    if not r.get("pred_per_s"):
                        out.append(f"| {label(r)} | failed | | | | | | | | | | | 0/{r['runs']} |")
                        continue
                    of_bound = f"{r['pred_per_s'] / bound['full_path_pred_per_s']:.0%}" if bound else "–"
                    out.append(
                        f"| {'**' + label(r) + '**' if r['server'] == 'inferd' else label(r)} | "
                        f"{_f(r['req_per_s'])} | "
                        f"{_f(r['pred_per_s'])} | {_ratio(r['pred_per_s'], ref_pps)} | "
                        f"{_f(r['p50_ms'], 2)} | "
                        f"{_f(r['p99_ms'], 2)} | {_ratio(r['p99_ms'], ref_p99)} | {_f(r['errors'])} | "
                        f"{_f(r['cpu_s_per_1k_pred'], 3)} | {_f(r['peak_mem_mib'])} | "
                        f"{_f(r['idle_mem_mib'])} | "
                        f"{of_bound} | {r['ok_runs']}/{r['runs']} |"
                    )
                out.append("")
    failures: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        for f in r.get("failures", []):
            failures.setdefault(label(r), {}).setdefault(f.split("\n")[0][:300], []).append(
                f"{r['model']}/{r['instances']}/c{r['connections']}"
            )
    out += ["## Failures", ""]
    if results["install_errors"]:
        for name, err in results["install_errors"].items():
            out.append(f"- **{name}** could not be installed: `{err.splitlines()[-1][:300] if err else ''}`")
    if failures:
        for name, errs in failures.items():
            for err, where in errs.items():
                out.append(f"- **{name}** ({len(where)} rows, e.g. {', '.join(where[:3])}): `{err}`")
    if not failures and not results["install_errors"]:
        out.append("None.")
    with_errors = [r for r in rows if r.get("errors")]
    out += [
        "",
        "Rows with errors (medians over rounds; non-2xx status codes where the run recorded them):",
        "",
    ]
    for r in with_errors:
        codes: dict[str, int] = {}
        for run in results.get("runs", []):
            if all(run.get(k) == r[k] for k in ("server", "variant", "model", "instances", "connections")):
                for code, count in (run.get("statuses") or {}).items():
                    codes[code] = codes.get(code, 0) + count
        detail = f" (HTTP {', '.join(f'{k}: {v}' for k, v in sorted(codes.items()))})" if codes else ""
        out.append(
            f"- {label(r)}, {r['model']}, {r['instances']} instances, c{r['connections']}: "
            f"{r['errors']:,.0f} errors{detail}"
        )
    if not with_errors:
        out.append("- none")
    out += ["", "## Versions", "", "| where | package | version |", "| --- | --- | --- |"]
    for where, pkgs in results["versions"].items():
        for p, v in pkgs.items():
            out.append(f"| {where} | {p} | {v} |")
    out += ["", "Raw numbers (every run, and the medians above): `bench/results/latest.json`.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    # Regenerate the markdown (and plot) from a results file: python -m bench.report [results.json]
    import json
    import sys

    bench = Path(__file__).resolve().parent
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else bench / "results" / "latest.json"
    res = json.loads(src.read_text())
    png = bench.parent / "docs" / "benchmarks.png"
    error = plot(res, src, png, bench / ".venvs" / "plot")
    write(bench.parent / "docs" / "benchmarks.md", res, None if error else png.name)
    print(error or f"wrote docs/benchmarks.md and {png.name} from {src}")
