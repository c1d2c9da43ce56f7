"""The report of a ``select`` run: a terminal table, JSON, Markdown, and a PNG scatter plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson

from inferd.select.choose import MEASURED, SERVER
from inferd.select.selection import Result, Selection

_DEFAULT_PLOT_AXES = ("p99_ms", "size_mb")


def columns(outcome: Selection) -> list[str]:
    """The metrics shown, optimizing first; server figures only when measured."""
    shown = [outcome.objective.name, *MEASURED]
    if outcome.options.url:
        shown += list(SERVER)
    if not outcome.options.price_per_hour:
        shown.remove("cost_per_million")
    return shown


def to_json(outcome: Selection) -> bytes:
    """Everything measured and decided, as indented JSON."""
    goal = outcome.objective
    verdicts = {v.name: v for v in outcome.verdicts}
    winner = outcome.winner
    options = {
        k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(outcome.options).items()
    }
    options["candidates"] = [str(p) for p in outcome.options.candidates]
    document: dict[str, Any] = {
        "optimize": {"metric": goal.name, "spec": goal.spec, "higher_is_better": goal.higher_is_better},
        "requirements": [str(r) for r in outcome.requirements],
        "winner": winner.candidate.name if winner else None,
        "candidates": [
            {
                "name": r.candidate.name,
                "path": str(r.candidate.path),
                "ok": r.error is None,
                "error": r.error,
                "metrics": r.figures,
                "details": r.details,
                "won": verdicts[r.candidate.name].won,
                "qualified": verdicts[r.candidate.name].qualified,
                "reasons": list(verdicts[r.candidate.name].reasons),
            }
            for r in outcome.results
        ],
        "machine": outcome.machine,
        "options": options,
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)


def table(outcome: Selection) -> Any:
    """A rich ``Table``: one row per candidate, the winner first-class, reasons in the last column."""
    from rich.table import Table

    goal = outcome.objective
    title = f"optimize {goal.name} ({'higher' if goal.higher_is_better else 'lower'} is better)"
    if outcome.requirements:
        title += " subject to " + ", ".join(str(r) for r in outcome.requirements)
    shown = columns(outcome)
    grid = Table(title=title)
    grid.add_column("candidate")
    for name in shown:
        grid.add_column(name, justify="right")
    grid.add_column("verdict")
    verdicts = {v.name: v for v in outcome.verdicts}
    for result in outcome.results:
        verdict = verdicts[result.candidate.name]
        text = "[bold green]winner[/]" if verdict.won else "; ".join(verdict.reasons)
        grid.add_row(
            result.candidate.name,
            *(_cell(result, name) for name in shown),
            text,
            style="bold" if verdict.won else None,
        )
    return grid


def markdown(outcome: Selection) -> str:
    """The table as Markdown, with the question asked and the machine it was measured on."""
    goal = outcome.objective
    shown = columns(outcome)
    winner = outcome.winner
    lines = [
        "# inferd select",
        "",
        f"Optimizing **{goal.name}** ({'higher' if goal.higher_is_better else 'lower'} is better)"
        + (
            " subject to " + ", ".join(f"`{r}`" for r in outcome.requirements)
            if outcome.requirements
            else " with no requirements"
        )
        + f", on `{outcome.options.data}`.",
        "",
        f"Winner: **{winner.candidate.name}** (`{winner.candidate.path}`)"
        if winner
        else "No candidate meets every requirement.",
        "",
        "| candidate | " + " | ".join(shown) + " | verdict |",
        "| --- | " + " | ".join("---:" for _ in shown) + " | --- |",
    ]
    verdicts = {v.name: v for v in outcome.verdicts}
    for result in outcome.results:
        verdict = verdicts[result.candidate.name]
        text = "**winner**" if verdict.won else "; ".join(verdict.reasons).replace("|", "\\|")
        cells = " | ".join(_cell(result, name) for name in shown)
        lines.append(f"| {result.candidate.name} | {cells} | {text} |")
    machine = outcome.machine
    lines += [
        "",
        f"Measured on {machine['host']} ({machine['machine']}, {machine['cpus']} CPUs, Python "
        f"{machine['python']}) at {machine['measured_at']}, one candidate at a time, each in a "
        "fresh process; latency at batch 1 in-process, throughput on one inference thread.",
        "",
    ]
    return "\n".join(lines)


def plot(outcome: Selection, path: Path) -> None:
    """The optimizing metric against each required metric (else p99 latency and size), one panel
    each, budgets as dashed lines, the winner as a star.

    Raises:
        ImportError: matplotlib is not installed (``pip install inferd[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goal = outcome.objective.name
    axes_metrics = list(dict.fromkeys(r.metric for r in outcome.requirements if r.metric != goal))
    if not axes_metrics:
        axes_metrics = list(_DEFAULT_PLOT_AXES)
    measured = [r for r in outcome.results if r.error is None]
    winner = outcome.winner
    figure, panels = plt.subplots(1, len(axes_metrics), figsize=(5.5 * len(axes_metrics), 4.5), squeeze=False)
    for panel, metric in zip(panels[0], axes_metrics, strict=True):
        points = [
            (r, x, y)
            for r in measured
            if (x := r.figures.get(metric)) is not None and (y := r.figures.get(goal)) is not None
        ]
        for result, x, y in points:
            won = winner is not None and result.candidate.name == winner.candidate.name
            panel.scatter(
                [x],
                [y],
                marker="*" if won else "o",
                s=220 if won else 50,
                color="tab:green" if won else "tab:blue",
            )
            panel.annotate(
                result.candidate.name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8
            )
        for requirement in outcome.requirements:
            if requirement.metric == metric:
                panel.axvline(
                    requirement.bound, color="tab:red", linestyle="--", label=f"budget {requirement}"
                )
            elif requirement.metric == goal:
                panel.axhline(requirement.bound, color="tab:red", linestyle=":", label=f"floor {requirement}")
        xs = [x for _, x, _ in points]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 100:
            panel.set_xscale("log")  # sizes and latencies that span orders of magnitude
        panel.set_xlabel(metric)
        panel.set_ylabel(goal)
        panel.grid(True, alpha=0.3)
        if panel.get_legend_handles_labels()[0]:
            panel.legend(fontsize="small")
    title = f"{goal}: winner {winner.candidate.name}" if winner else f"{goal}: no candidate qualifies"
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cell(result: Result, name: str) -> str:
    if result.error is not None:
        return "-"
    value = result.figures.get(name)
    if value is None:
        return "-"
    if name.endswith("_rps"):
        return f"{value:,.0f}"
    return f"{value:.4g}"
