"""What ``inferd select`` does once its flags are read: measure, report, and maybe promote."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from inferd.errors import InferdError, InvalidArgument
from inferd.select import promote as promotion
from inferd.select import report
from inferd.select.compatibility import api_changes, served_version
from inferd.select.selection import SelectOptions, run

NO_WINNER = 3
"""Exit status when no candidate meets every requirement."""
BAD_INPUT = 2
ROLLED_BACK = 1
"""Exit status when the winner's canary rollout was rolled back (as ``inferd rollout``'s)."""


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
    canary: promotion.Canary | None = None
    """Move the label through a guarded canary rollout on the server at ``wait_url``."""


def execute(options: SelectOptions, outputs: Outputs, promote: PromoteOptions | None) -> int:
    """Run ``select``; returns the exit status: 0 with a winner, 3 without one, 2 for bad input,
    a failed promotion, or one refused because it changes the served API; 1 when the canary
    rollout of the winner was rolled back."""
    try:
        _check_writable(outputs)
        planned = None
        if promote is not None:
            if promote.canary is not None and not (promote.wait_url and promote.label):
                raise InvalidArgument(
                    "--canary: the rollout runs on a server: give --wait_url URL (its REST address) "
                    "and --promote_label LABEL (the label it moves)"
                )
            planned = promotion.plan(
                promote.base, promote.label, promote.config_file, promote.canary is not None
            )
        outcome = run(options)
    except InferdError as exc:
        print(f"inferd select: {exc.message}", file=sys.stderr)
        return BAD_INPUT
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)  # a log or a pipe: keep the figures whole
    console.print(report.table(outcome))
    try:
        if outputs.json:
            outputs.json.write_bytes(report.to_json(outcome))
        if outputs.markdown:
            outputs.markdown.write_text(report.markdown(outcome))
        if outputs.plot:
            report.plot(outcome, outputs.plot)
    except OSError as exc:
        print(f"inferd select: cannot write the report to {exc.filename}: {exc.strerror}", file=sys.stderr)
        return BAD_INPUT
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
        if promote.canary is not None:
            print(_canary_plan(planned, promote.canary))
        return 0
    if refused:
        print(
            "inferd select: not promoted: clients of the served version would get other signatures or "
            "answers (listed above); pass --allow_api_change to promote anyway",
            file=sys.stderr,
        )
        return BAD_INPUT
    print(planned.describe(source), flush=True)
    canary = promote.canary
    try:
        promotion.apply(planned, source, promote.wait_url, promote.wait_timeout_s, canary is None)
    except InferdError as exc:
        print(f"inferd select: promotion failed: {exc.message}", file=sys.stderr)
        return BAD_INPUT
    if canary is None:
        print(f"promoted {winner.candidate.name} to {promote.base / str(planned.version)}")
        return 0
    return _roll_out(planned, canary, promote.wait_url or "", winner.candidate.name)


def _check_writable(outputs: Outputs) -> None:
    """Refuse, before anything is measured, a report file whose folder does not exist.

    Raises:
        InvalidArgument: the flag, the file, and the missing folder.
    """
    for flag, path in (("--json", outputs.json), ("--markdown", outputs.markdown), ("--plot", outputs.plot)):
        if path is not None and not path.absolute().parent.is_dir():
            raise InvalidArgument(
                f"{flag} {path}: there is no folder {path.absolute().parent} to write it in"
            )


def _canary_plan(planned: promotion.Promotion, canary: promotion.Canary) -> str:
    steps = ",".join(f"{p:g}" for p in canary.steps)
    guards = ", ".join(canary.guards) or "no guard"
    return (
        f"then a canary rollout of model {planned.model_name} from label {planned.label!r} to version "
        f"{planned.version}: steps {steps}% of {canary.step_s:g} s, {guards}; the label moves at its end"
    )


def _roll_out(planned: promotion.Promotion, canary: promotion.Canary, url: str, name: str) -> int:
    """Start the canary rollout of the promoted version on the server at ``url``, follow it, and
    move the label in the config file once the rollout moved it on the server."""
    from inferd.rollout import RolloutClient, describe

    print(_canary_plan(planned, canary), flush=True)
    assert planned.label is not None
    client = RolloutClient(url, canary.admin_token)
    model = planned.model_name
    try:
        state = client.command(model, "start", canary.body(planned.version, planned.label))
        state = client.follow(
            model, state, min(1.0, canary.step_s / 4), lambda event: print(describe(event), flush=True)
        )
    except InferdError as exc:
        print(
            f"inferd select: canary rollout: {exc.message}; version {planned.version} is in "
            f"{planned.base}; the label was not moved in the config file (`inferd rollout {model} "
            f"--status --url {url}` shows where the server's rollout is)",
            file=sys.stderr,
        )
        return BAD_INPUT
    if state["state"] != "done":
        failed = next((e.get("failed") for e in reversed(state["history"]) if e.get("failed")), None)
        print(
            f"inferd select: the canary of {name} (version {planned.version}) was {state['state']}"
            f"{': ' + '; '.join(failed) if failed else ''}; label {planned.label!r} stays on version "
            f"{state['baseline']}",
            file=sys.stderr,
        )
        return ROLLED_BACK
    try:
        promotion.finish(planned)
    except InferdError as exc:
        print(f"inferd select: {exc.message}", file=sys.stderr)
        return BAD_INPUT
    print(
        f"promoted {name} to {planned.base / str(planned.version)} through a canary rollout: "
        f"label {planned.label!r} is on version {planned.version}"
    )
    return 0
