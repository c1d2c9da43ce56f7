"""What ``inferd select`` does once its flags are read: measure, report, and maybe promote."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from inferd.errors import InferdError
from inferd.select import SelectOptions, report, run
from inferd.select import promote as promotion
from inferd.select.compatibility import api_changes, served_version

NO_WINNER = 3
"""Exit status when no candidate meets every requirement."""
BAD_INPUT = 2


@dataclass(frozen=True, slots=True)
class Outputs:
    """Where the report goes besides the terminal."""

    json: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None


@dataclass(frozen=True, slots=True)
class PromoteOptions:
    """``--promote REPO/NAME`` and its companions."""

    base: Path
    label: str | None = None
    config_file: Path | None = None
    apply: bool = False
    wait_url: str | None = None
    wait_timeout_s: float = 300.0
    allow_api_change: bool = False
    """Promote even when the winner's signatures or answer form differ from the served version's."""


def execute(options: SelectOptions, outputs: Outputs, promote: PromoteOptions | None) -> int:
    """Run ``select``; returns the exit status: 0 with a winner, 3 without one, 2 for bad input,
    a failed promotion, or one refused because it changes the served API."""
    try:
        planned = promotion.plan(promote.base, promote.label, promote.config_file) if promote else None
        outcome = run(options)
    except InferdError as exc:
        print(f"inferd select: {exc.message}", file=sys.stderr)
        return BAD_INPUT
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)  # a log or a pipe: keep the figures whole
    console.print(report.table(outcome))
    if outputs.json:
        outputs.json.write_bytes(report.to_json(outcome))
    if outputs.markdown:
        outputs.markdown.write_text(report.markdown(outcome))
    if outputs.plot:
        report.plot(outcome, outputs.plot)
    winner = outcome.winner
    if winner is None:
        print("no candidate meets every requirement:", file=sys.stderr)
        for verdict in outcome.verdicts:
            print(f"  {verdict.name}: {'; '.join(verdict.reasons)}", file=sys.stderr)
        return NO_WINNER
    print(f"winner: {winner.candidate.name} ({winner.candidate.path})", flush=True)
    if promote is None or planned is None:
        return 0
    source = winner.candidate.path
    try:
        changes = api_changes(promote.base, source, winner.candidate.plan.settings)
    except InferdError as exc:
        print(f"inferd select: {exc.message}", file=sys.stderr)
        return BAD_INPUT
    if changes:
        served = served_version(promote.base)
        listed = "\n".join(f"  {change}" for change in changes)
        print(
            f"the API changes: {winner.candidate.name} does not answer as {served} does:\n{listed}",
            flush=True,
        )
    refused = bool(changes) and not promote.allow_api_change
    if not promote.apply:
        if refused:
            print("--apply would refuse this promotion unless --allow_api_change is given")
        print(f"dry run (add --apply to do it):\n{planned.describe(source)}")
        return 0
    if refused:
        print(
            "inferd select: not promoted: clients of the served version would get other signatures or "
            "answers (listed above); pass --allow_api_change to promote anyway",
            file=sys.stderr,
        )
        return BAD_INPUT
    print(planned.describe(source), flush=True)
    try:
        promotion.apply(planned, source, promote.wait_url, promote.wait_timeout_s)
    except InferdError as exc:
        print(f"inferd select: promotion failed: {exc.message}", file=sys.stderr)
        return BAD_INPUT
    print(f"promoted {winner.candidate.name} to {promote.base / str(planned.version)}")
    return 0
