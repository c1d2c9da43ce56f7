"""``inferd select``: measure candidate models on one machine and pick the best that fits budgets.

One optimizing metric (accuracy, F1, AUC, RMSE, a user's function) is maximised or minimised
among the candidates that meet every satisficing requirement (``p99_ms<=5``, ``size_mb<=2``).
Each candidate is measured in a process of its own (``measure``), then, with ``--url``, through
a running server with ``inferd bench``'s load generator; ``choose`` picks the winner and says why
each other candidate lost; ``report`` writes the table, JSON, Markdown and plot; ``promote``
copies the winner into a model repository.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from inferd.errors import InferdError, InvalidArgument
from inferd.repository import folder_bytes
from inferd.select.candidates import Candidate, resolve
from inferd.select.choose import Requirement, Verdict, choose, parse_requirement
from inferd.select.measure import DataMismatch, Job, Measurement, check_data, measure
from inferd.select.objectives import Objective, objective

log = logging.getLogger(__name__)

__all__ = ["SelectOptions", "Selection", "run"]


@dataclass(frozen=True, slots=True)
class SelectOptions:
    """One ``inferd select`` run; see ``inferd select --help`` for each option."""

    candidates: tuple[Path, ...]
    data: str
    label: str
    optimize: str
    requirements: tuple[str, ...] = ()
    direction: str | None = None
    average: str = "macro"
    output: str | None = None
    signature: str | None = None
    price_per_hour: float = 0.0
    batch_size: int = 0
    latency_calls: int = 1000
    latency_budget_s: float = 2.0
    throughput_budget_s: float = 1.0
    timeout_s: float = 300.0
    url: str | None = None
    server_duration_s: float = 3.0
    drop_columns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Result:
    """One candidate's figures (metric name -> value, None where not measured) or its error."""

    candidate: Candidate
    figures: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    """What the figures came from: the output scored, the batch size, rows rejected."""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    """A whole run: what was asked, every candidate's result and verdict, and the winner."""

    objective: Objective
    requirements: tuple[Requirement, ...]
    results: tuple[Result, ...]
    verdicts: tuple[Verdict, ...]
    machine: dict[str, object]
    options: SelectOptions

    @property
    def winner(self) -> Result | None:
        won = [v.name for v in self.verdicts if v.won]
        return next((r for r in self.results if won and r.candidate.name == won[0]), None)


def prepare(options: SelectOptions) -> tuple[Objective, tuple[Requirement, ...], list[Candidate]]:
    """Check the options and resolve the candidates, before anything is measured.

    Raises:
        InvalidArgument: bad ``--optimize``, ``--require``, ``--data`` or ``--label``, or candidate
            paths (named).
    """
    goal = objective(options.optimize, options.direction, options.average, options.output)
    requirements = tuple(
        parse_requirement(text, goal, options.price_per_hour > 0, options.url is not None)
        for text in options.requirements
    )
    check_data(options.data, options.label, options.drop_columns)
    return goal, requirements, resolve(options.candidates)


def run(options: SelectOptions) -> Selection:
    """Measure every candidate, one at a time, and choose.

    A candidate that fails to load or to score is reported with its error and loses; the others
    are still measured. Data that does not fit a candidate's inputs (a column too many, one
    missing) is a mistake in the data, not the candidate: the run stops there.

    Raises:
        InvalidArgument: see ``prepare``; or the validation set does not fit the first candidate
            measured (its name, the reason, and the columns found).
    """
    goal, requirements, candidates = prepare(options)
    results = []
    for candidate in candidates:
        log.info("measuring %s (%s)", candidate.name, candidate.path)
        results.append(_measure(candidate, goal, options))
    if options.url:
        results = [_through_server(r, options) for r in results]
    verdicts = choose(
        {r.candidate.name: r.figures for r in results if r.error is None},
        {r.candidate.name: r.error for r in results if r.error is not None},
        goal,
        requirements,
    )
    order = {r.candidate.name: i for i, r in enumerate(results)}
    return Selection(
        goal,
        requirements,
        tuple(results),
        tuple(sorted(verdicts, key=lambda v: order[v.name])),
        _machine(),
        options,
    )


def _measure(candidate: Candidate, goal: Objective, options: SelectOptions) -> Result:
    job = Job(
        candidate,
        options.data,
        options.label,
        options.signature,
        goal.spec == "auc",
        options.batch_size,
        options.latency_calls,
        options.latency_budget_s,
        options.throughput_budget_s,
        logging.getLogger().getEffectiveLevel(),
        options.drop_columns,
    )
    try:
        measured = measure(job, options.timeout_s)
    except DataMismatch as exc:
        raise InvalidArgument(
            f"--data {options.data} does not fit candidate {candidate.name}: {exc.message} "
            "(columns that are neither inputs nor the label can be left out with --drop_columns)"
        ) from None
    except InferdError as exc:
        return Result(candidate, error=exc.message)
    try:
        score, output = goal.score(measured.labels, measured.outputs)
    except InferdError as exc:
        return Result(candidate, error=exc.message)
    return Result(candidate, _figures(candidate, goal, score, measured, options), _details(output, measured))


def _figures(
    candidate: Candidate, goal: Objective, score: float, measured: Measurement, options: SelectOptions
) -> dict[str, float | None]:
    cost = (
        options.price_per_hour / 3600 / measured.throughput_rps * 1e6
        if options.price_per_hour and measured.throughput_rps
        else None
    )
    return {
        goal.name: score,
        "p50_ms": measured.latency_ms["p50"],
        "p90_ms": measured.latency_ms["p90"],
        "p99_ms": measured.latency_ms["p99"],
        "throughput_rps": measured.throughput_rps,
        "size_mb": folder_bytes(candidate.path) / 1e6,
        "peak_memory_mb": measured.peak_memory_bytes / 1e6,
        "cpu_s_per_1000": measured.cpu_s_per_1000,
        "cost_per_million": cost,
    }


def _details(output: str, measured: Measurement) -> dict[str, object]:
    return {
        "output": output,
        "rows": len(measured.labels),
        "rejected_rows": measured.rejected,
        "batch_size": measured.batch_size,
    }


def _through_server(result: Result, options: SelectOptions) -> Result:
    """Add latency and throughput through the server at ``--url``, which must serve the
    candidate under its name, from ``inferd bench``'s closed loop at concurrency 1."""
    from inferd import loadtest

    if result.error is not None:
        return result
    bench = loadtest.BenchOptions(
        url=options.url or "",
        model=result.candidate.plan.name,
        concurrency=(1,),
        duration_s=options.server_duration_s,
        warmup_s=min(1.0, options.server_duration_s),
        metrics_url="",
    )
    try:
        (step,) = loadtest.run(bench)
    except (ValueError, OSError) as exc:
        message = f"not measured through {options.url}: {exc}"
        return Result(result.candidate, result.figures, {**result.details, "server_error": message})
    latency = step.latency_ms
    figures = {
        **result.figures,
        "server_p50_ms": latency["p50"],
        "server_p90_ms": latency["p90"],
        "server_p99_ms": latency["p99"],
        "server_throughput_rps": step.requests_per_s,
    }
    return Result(result.candidate, figures, {**result.details, "server_errors": step.errors})


def _machine() -> dict[str, object]:
    return {
        "host": platform.node(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
