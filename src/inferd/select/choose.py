"""Satisficing requirements (``--require "p99_ms<=5"``) and the choice of the winner."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from inferd.errors import InvalidArgument
from inferd.select.objectives import Objective

MEASURED = {
    "p50_ms": "latency at batch 1, median (ms)",
    "p90_ms": "latency at batch 1, 90th percentile (ms)",
    "p99_ms": "latency at batch 1, 99th percentile (ms)",
    "throughput_rps": "rows/s at the chosen batch size, one inference thread",
    "size_mb": "size of the version folder on disk (MB, 10^6 bytes)",
    "peak_memory_mb": "peak resident memory of loading and predicting (MB)",
    "cpu_s_per_1000": "CPU-seconds per 1,000 predictions",
    "cost_per_million": "cost of a million predictions at --price-per-hour",
}
SERVER = {
    "server_p50_ms": "latency through the server at --url, median (ms)",
    "server_p90_ms": "latency through the server at --url, 90th percentile (ms)",
    "server_p99_ms": "latency through the server at --url, 99th percentile (ms)",
    "server_throughput_rps": "requests/s through the server, one at a time",
}
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
_NEGATED = {"<=": ">", "<": ">=", ">=": "<", ">": "<="}
_GRAMMAR = re.compile(
    r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
)


@dataclass(frozen=True, slots=True)
class Requirement:
    """``metric op bound``: a budget a candidate must meet."""

    metric: str
    op: str
    bound: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"

    def holds(self, value: float | None) -> bool:
        return value is not None and _OPS[self.op](value, self.bound)

    def why_not(self, value: float | None) -> str:
        """Why ``value`` fails this requirement, e.g. ``p99_ms 7.2 > 5``."""
        if value is None:
            return f"{self.metric} not measured"
        return f"{self.metric} {_number(value)} {_NEGATED[self.op]} {self.bound:g}"


def parse_requirement(text: str, objective: Objective, with_price: bool, with_url: bool) -> Requirement:
    """Parse ``<metric><op><number>``: ops ``<=``, ``<``, ``>=``, ``>``.

    Raises:
        InvalidArgument: bad syntax, an unknown metric, or a metric that needs an option not given
            (``cost_per_million`` needs ``--price-per-hour``, ``server_*`` need ``--url``).
    """
    match = _GRAMMAR.fullmatch(text)
    if match is None:
        raise InvalidArgument(
            f'--require {text!r}: expected <metric><op><number> with op one of <=, <, >=, >, e.g. "p99_ms<=5"'
        )
    metric, op, number = match.groups()
    known = [*MEASURED, *SERVER, objective.name]
    if metric not in known:
        raise InvalidArgument(f"--require {text!r}: unknown metric {metric!r}; expected one of {known}")
    if metric == "cost_per_million" and not with_price:
        raise InvalidArgument(f"--require {text!r}: cost_per_million needs --price-per-hour")
    if metric in SERVER and not with_url:
        raise InvalidArgument(f"--require {text!r}: {metric} is measured through a server; give --url")
    return Requirement(metric, op, float(number))


@dataclass(frozen=True, slots=True)
class Verdict:
    """How one candidate fared: ``won``, or why it lost."""

    name: str
    won: bool
    qualified: bool
    reasons: tuple[str, ...]


def choose(
    figures: Mapping[str, Mapping[str, float | None]],
    errors: Mapping[str, str],
    objective: Objective,
    requirements: Sequence[Requirement],
) -> list[Verdict]:
    """The best candidate by ``objective`` among those meeting every requirement (the first given
    wins a tie), and why each other one lost.

    Args:
        figures: per candidate (in the order given), metric name -> value; None where not measured.
        errors: candidates that could not be measured, with the error.
    """
    failed: dict[str, tuple[str, ...]] = {name: (f"failed: {error}",) for name, error in errors.items()}
    qualified = []
    for name, values in figures.items():
        if name in failed:
            continue
        misses = tuple(
            r.why_not(values.get(r.metric)) for r in requirements if not r.holds(values.get(r.metric))
        )
        if misses:
            failed[name] = misses
        else:
            qualified.append(name)
    winner = None
    for name in qualified:
        value = figures[name][objective.name]
        if value is not None and (
            winner is None or objective.better(value, _value(figures, winner, objective))
        ):
            winner = name
    verdicts = []
    for name in [*figures, *(n for n in errors if n not in figures)]:
        if name == winner:
            verdicts.append(Verdict(name, True, True, ()))
        elif name in failed:
            verdicts.append(Verdict(name, False, False, failed[name]))
        else:
            verdicts.append(Verdict(name, False, True, (_lost(figures, name, winner, objective),)))
    return verdicts


def _value(figures: Mapping[str, Mapping[str, float | None]], name: str, objective: Objective) -> float:
    value = figures[name][objective.name]
    assert value is not None
    return value


def _lost(
    figures: Mapping[str, Mapping[str, float | None]], name: str, winner: str | None, objective: Objective
) -> str:
    value = figures[name][objective.name]
    if value is None or winner is None:
        return f"{objective.name} not measured"
    best = _value(figures, winner, objective)
    if value == best:
        return f"{objective.name} {_number(value)} ties winner's {_number(best)}; the earlier candidate wins"
    op = "<" if objective.higher_is_better else ">"
    return f"{objective.name} {_number(value)} {op} winner's {_number(best)}"


def _number(value: float) -> str:
    return f"{value:.4g}"
