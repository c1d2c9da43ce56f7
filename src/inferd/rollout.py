"""Guarded canary rollouts, run by the server: move a model's traffic split step by step from the
version a label points to towards a new version, check guards on live metrics after each step,
roll back at once when one fails, and finish by moving the label.

A rollout is started through the admin route ``POST /v2/repository/models/NAME/rollout`` (what
``inferd rollout`` sends). Each step sets the split (``ModelManager.set_traffic``: baseline
``100 - p``, canary ``p``), waits ``step_s``, then checks every guard over that step's requests:

- ``error_rate``: failed / answered requests of the canary;
- ``p99_ms``: the canary's 99th percentile request time, interpolated in its histogram bucket as
  Prometheus's ``histogram_quantile`` does;
- ``agreement``: the shadow agreement of baseline -> canary rows (needs ``[shadow]``), over the step.

With ``min_requests`` N, a step ends only once the canary has answered (or failed) N requests in
it: past ``step_s`` it waits on, ``step_s`` at a time, and its guards are then checked over the
whole step, so that a version no request reached is never promoted on guards that held for want
of observations.

A guard reads ``METRIC<=X``, ``METRIC>=X`` (also ``<``, ``>``), where X is a number or
``F*baseline``: F times the same metric of the baseline version over the same step. A guard whose
metric had no observation in the step holds. A failed guard sets the split to 100% baseline
(``rolled_back``); after the last step the label moves to the canary (``move_label``, the admin
move: while it does, the rollout stays ``running`` with the last event ``moving the label`` and
takes no command), then it is ``done`` and the split override is dropped.

An operator can act on a rollout through ``command`` (the admin routes
``POST .../rollout/ACTION`` and the dashboard's, both): ``pause`` holds the split where it is (no
guard is checked) until ``resume`` starts the current step again; ``promote`` ends it now as if the
last step had passed (the label moves); ``abort`` ends it as a failed guard does (100% baseline).

With ``--rollout_state_dir``, each rollout's state is written (atomically) to
``DIR/MODEL.rollout.json`` at every change, and a restarted server reads it back before it serves
a request: a rollout that was ``running`` resumes at its step or rolls back, as its
``on_restart`` says (one whose label was moving moves it and ends); a paused one stays paused at
its step; a rolled-back one keeps the baseline's 100%, a finished one its label.

Under ``--workers N`` the workers share the rollouts (``Rollouts``' ``shared``): a command through
any worker holds in all of them when it answers, one worker runs the steps and reads the guards
over every worker's requests, and another takes the steps over if that one dies (the step it was
in starts again). The first worker to start reads the state folder back, for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inferd.errors import (
    InferdError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from inferd.manager import ModelManager
from inferd.metrics import LATENCY_BUCKETS_S, Metrics
from inferd.servable import Servable
from inferd.shared_state import SharedState
from inferd.types import ModelRef

log = logging.getLogger(__name__)

_GUARD = re.compile(
    r"\s*(error_rate|p99_ms|agreement)\s*(<=|>=|<|>)\s*(?:([0-9.eE+-]+)\s*\*\s*baseline|([0-9.eE+-]+)|baseline)\s*"
)
METRICS = ("error_rate", "p99_ms", "agreement")
ON_RESTART = ("resume", "rollback")
ACTIONS = ("start", "status", "pause", "resume", "promote", "abort")
"""What ``Rollouts.command`` does: the admin routes' and the dashboard's last path segment."""
_NEEDS = {
    "pause": ("running",),
    "resume": ("paused",),
    "promote": ("running", "paused"),
    "abort": ("running", "paused"),
}
"""The states each operator action applies to."""
PROMOTE_WAIT_S = 10.0
"""How long a promote waits for the label to move before it answers (the rollout finishing)."""
FINISHING = "moving the label"
"""The last history event of a rollout whose steps passed (or that was promoted), while its label
moves; it is ``done`` once the label has moved."""

Agreement = Callable[[str, int, int], tuple[int, int]]
"""(model, baseline, canary) -> (agreeing rows, rows compared) so far."""

Readings = Callable[["RolloutState"], Awaitable[dict[str, Any]]]
"""A rollout -> the counts its guards read, as ``Rollouts._local_readings`` returns them."""


@dataclass(frozen=True, slots=True)
class Guard:
    """``metric op bound`` where bound is ``value`` or ``value * baseline`` (``relative``)."""

    metric: str
    op: str
    value: float
    relative: bool

    @staticmethod
    def parse(text: str) -> Guard:
        """Raises InvalidArgument naming the guard and the expected form."""
        match = _GUARD.fullmatch(text)
        if match is None:
            raise InvalidArgument(
                f"guard {text!r}: expected METRIC<=X or METRIC>=X with METRIC one of {list(METRICS)} "
                "and X a number or F*baseline"
            )
        metric, op, factor, number = match.groups()
        try:
            value = float(number if number is not None else factor or 1.0)
        except ValueError:
            raise InvalidArgument(f"guard {text!r}: {factor or number!r} is not a number") from None
        if not math.isfinite(value):  # its text ("inf") would not parse again when the step loop reads it
            raise InvalidArgument(f"guard {text!r}: {factor or number!r} is not a finite number")
        return Guard(metric, op, value, number is None)

    def holds(self, canary: float | None, baseline: float | None) -> bool:
        """True when the canary's value meets the bound, or when a value is missing."""
        if canary is None or (self.relative and baseline is None):
            return True
        bound = self.value * baseline if self.relative and baseline is not None else self.value
        return {
            "<=": canary <= bound,
            ">=": canary >= bound,
            "<": canary < bound,
            ">": canary > bound,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:.15g}{'*baseline' if self.relative else ''}"


@dataclass(slots=True)
class RolloutState:
    """One model's rollout, as shown in the status and written to the state file."""

    model: str
    baseline: int
    canary: int
    label: str
    steps: list[float]
    step_s: float
    guards: list[str]
    on_restart: str = "rollback"
    min_requests: int = 0
    """The canary requests each step needs before its guards are checked (0: none)."""
    state: str = "running"
    """``running``, ``paused``, ``rolled_back`` or ``done``."""
    step: int = 0
    """Index into ``steps`` of the step running (or that failed)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    checked: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """The guards' metrics over the last step checked: metric -> ``canary`` and ``baseline``."""
    moved: dict[str, int] = field(default_factory=dict)
    """Label -> version, as the model's earlier finished rollouts moved them (this file replaced
    theirs): moved again at a restart."""

    def note(self, event: str, **detail: Any) -> None:
        self.history.append({"time": time.time(), "event": event, **detail})
        log.info("rollout of model %s to version %d: %s %s", self.model, self.canary, event, detail or "")


@dataclass(slots=True)
class RolloutBook:
    """Every model's last rollout, and the readings its running step started from: what one
    process keeps, or what the workers of ``--workers N`` share (``shared_state``)."""

    generation: int = 0
    """Counts the changes (0: none yet)."""
    states: dict[str, RolloutState] = field(default_factory=dict)
    before: dict[str, dict[str, Any]] = field(default_factory=dict)
    restored: bool = False
    """The state folder was read back (by the first worker to start)."""


class _Superseded(Exception):
    """A step loop's rollout was changed by someone else (an operator, another worker)."""


class Rollouts(Collector):
    """Runs rollouts, at most one per model. Event loop thread only. Exports
    ``inferd_rollout_canary_percent{model,baseline,canary,state}``: the canary's share now.

    Every change (a command, a step, a guard's verdict) is made to the latest ``RolloutBook``
    under a lock and then applied: the split each state implies is set in this process's manager
    (a finishing rollout's label moves with ``move_label``, then it is done). With ``shared``
    (``--workers N``) the book is published to the workers' private folder, every worker applies
    it (``follow``), and a change answers once all have; one worker at a time, the driver (the
    holder of a lock file; another takes over if it dies), runs the step loops, and reads the
    guards' metrics over every worker (``readings``).

    Args:
        manager: whose split is set (and, without ``move_label``, labels moved).
        metrics: where per-version request counts and times are read.
        agreement: the shadow's agreement counts; None when no shadow is wired.
        state_dir: where states are written and read back; None keeps them in memory only.
        shared: the book the workers share; None: this process's own.
        readings: the requests and agreement counts a rollout's guards read (see
            ``_local_readings``); None: this process's own.
        move_label: moves a label (model, label, version) where every process serving the model
            holds it (``ModelControl.move_label``: the admin state); None: this manager's only.
            A finished rollout's move goes there, so that a later admin move wins over it.
    """

    def __init__(
        self,
        manager: ModelManager[Servable],
        metrics: Metrics,
        agreement: Agreement | None = None,
        state_dir: Path | None = None,
        shared: SharedState[RolloutBook] | None = None,
        readings: Readings | None = None,
        move_label: Callable[[str, str, int], Awaitable[None]] | None = None,
    ) -> None:
        self._manager = manager
        self._metrics = metrics
        self._agreement = agreement
        self._state_dir = state_dir
        self._shared = shared
        self._readings = readings or self._local_readings
        self._move_label = move_label or self._move_label_here
        self._book = RolloutBook()  # the one applied here
        self._lock = asyncio.Lock()  # held while changing the book
        self._tasks: dict[str, asyncio.Task[None]] = {}  # the driver's step loops, by model
        self._mine: dict[str, RolloutState] = {}  # each loop's state as it last left it
        self._driving = shared is None
        self._driver_lock: int | None = None  # the open lock file, when shared
        self._closed = False
        metrics.registry.register(self)

    def collect(self) -> Iterator[Any]:
        share = GaugeMetricFamily(
            "inferd_rollout_canary_percent",
            "The canary's share of a model's split now (100 once done, 0 once rolled back)",
            labels=["model", "baseline", "canary", "state"],
        )
        for state in list(self._book.states.values()):
            percent = {"done": 100.0, "rolled_back": 0.0}.get(state.state, state.steps[state.step])
            share.add_metric([state.model, str(state.baseline), str(state.canary), state.state], percent)
        yield share

    async def close(self) -> None:
        """Stop the running rollouts where they are (their state says ``running``), and hand the
        driving to another worker."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._driver_lock is not None:
            os.close(self._driver_lock)
            self._driver_lock = None
            self._driving = False

    async def status(self, model: str) -> dict[str, Any]:
        """The model's last rollout as a JSON-able dict: its state (see ``RolloutState``), plus
        ``weights`` (version -> percent of the unnamed requests now; empty when unsplit) and
        ``current`` (while running: the guards' metrics over the step so far, as ``checked``).

        Raises:
            NotFound: the model never had a rollout.
        """
        state = self._book.states.get(model)
        if state is None:
            raise NotFound(f"model {model} has no rollout")
        before = self._book.before.get(model)
        current = await self._values(state, before) if state.state == "running" and before else {}
        split = self._manager.split(model)
        return {**asdict(state), "weights": split.percents() if split else {}, "current": current}

    async def command(self, model: str, action: str, body: bytes) -> dict[str, Any]:
        """Do ``action`` (one of ``ACTIONS``) on model ``model``'s rollout, as the admin routes and
        the dashboard ask; the answer is its ``status`` afterwards. ``start`` reads ``body``, a
        JSON object (see ``start``); the others ignore it.

        Raises:
            InvalidArgument: an unknown action, a bad start body, or an action the rollout's
                state does not allow (e.g. ``resume`` of one that is not paused).
            NotFound: the model has no rollout (or, for ``start``, no such label or version).
        """
        if action == "start":
            try:
                document = orjson.loads(body or b"{}")
            except orjson.JSONDecodeError as exc:
                raise InvalidArgument(f"the body is not valid JSON: {exc}") from None
            if not isinstance(document, dict):
                raise InvalidArgument("the body must be a JSON object")
            await self.start(model, document)
        elif action in _NEEDS:
            async with self._editing() as book:
                state = book.states.get(model)
                if state is None:
                    raise NotFound(f"model {model} has no rollout")
                if _finishing(state):
                    raise InvalidArgument(
                        f"the rollout of model {model} is finishing: label {state.label!r} is moving "
                        f"to version {state.canary}; see its status"
                    )
                if state.state not in _NEEDS[action]:
                    raise InvalidArgument(
                        f"the rollout of model {model} is {state.state}; "
                        f"{action} needs one that is {' or '.join(_NEEDS[action])}"
                    )
                if action == "pause":
                    state.state = "paused"
                    state.note("paused", step=state.step, percent=state.steps[state.step])
                elif action == "resume":
                    state.state = "running"
                    state.note("resumed", step=state.step)
                    book.before.pop(model, None)  # the step starts again
                elif action == "promote":
                    self._manager.check_routable(model, state.canary)  # raises before any change
                    state.note("promoted", step=state.step)
                    state.state = "running"  # the driver finishes it
                    state.note(FINISHING, label=state.label, version=state.canary)
                else:
                    state.state = "rolled_back"
                    state.note("rolled back", step=state.step, failed=["aborted by an operator"])
            waited_s = 0.0  # a promote answers once the label moved, or after PROMOTE_WAIT_S
            while _finishing(self._book.states[model]) and waited_s < PROMOTE_WAIT_S and not self._closed:
                await asyncio.sleep(0.01)
                waited_s += 0.01
        elif action != "status":
            raise InvalidArgument(f"rollout action {action!r}: expected one of {list(ACTIONS)}")
        return await self.status(model)

    async def start(self, model: str, document: dict[str, Any]) -> dict[str, Any]:
        """Start a rollout from a request body: ``to`` (version), ``label`` (default ``stable``:
        the baseline is where it points), ``steps`` (percents, increasing, last 100), ``step_s``,
        ``guards`` (strings), ``on_restart`` (``rollback`` or ``resume``), ``min_requests``
        (canary requests a step needs, default 0).

        Raises:
            InvalidArgument: a bad field (named), or a rollout of the model is already running.
            NotFound: the label or the canary version is not available.
        """
        canary = document.get("to")
        if isinstance(canary, bool) or not isinstance(canary, int):
            raise InvalidArgument(f"'to' must be a version number, got {canary!r}")
        label = document.get("label", "stable")
        if not isinstance(label, str):
            raise InvalidArgument(f"'label' must be a string, got {label!r}")
        steps = document.get("steps", [1, 5, 25, 50, 100])
        if (
            not isinstance(steps, list)
            or not steps
            or not all(isinstance(p, int | float) and not isinstance(p, bool) and 0 < p <= 100 for p in steps)
            or any(b <= a for a, b in itertools.pairwise(steps))
            or steps[-1] != 100
        ):
            raise InvalidArgument(
                f"'steps' must be increasing percents in (0, 100] ending at 100, got {steps!r}"
            )
        step_s = document.get("step_s", 60)
        if isinstance(step_s, bool) or not isinstance(step_s, int | float) or step_s <= 0:
            raise InvalidArgument(f"'step_s' must be a number of seconds > 0, got {step_s!r}")
        guards = document.get("guards", [])
        if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
            raise InvalidArgument(f"'guards' must be a list of strings, got {guards!r}")
        parsed = [Guard.parse(g) for g in guards]
        on_restart = document.get("on_restart", "rollback")
        if on_restart not in ON_RESTART:
            raise InvalidArgument(f"'on_restart' must be one of {list(ON_RESTART)}, got {on_restart!r}")
        min_requests = document.get("min_requests", 0)
        if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 0:
            raise InvalidArgument(f"'min_requests' must be a whole number >= 0, got {min_requests!r}")
        async with self._editing() as book:
            previous = book.states.get(model)
            if previous is not None and previous.state in ("running", "paused"):
                raise InvalidArgument(
                    f"a rollout of model {model} is already {previous.state}; "
                    "see its status, or abort it first"
                )
            baseline = self._manager.labels(model).get(label)
            if baseline is None:
                raise NotFound(f"model {model} has no label {label!r} to roll out from")
            if baseline == canary:
                raise InvalidArgument(f"label {label!r} already points to version {canary}")
            with self._manager.lease(ModelRef(model, version=canary)):
                pass  # raises NotFound unless the canary is AVAILABLE
            state = RolloutState(
                model,
                baseline,
                canary,
                label,
                [float(p) for p in steps],
                float(step_s),
                [str(g) for g in parsed],
                on_restart,
                min_requests,
            )
            if previous is not None:  # what the earlier finished rollouts moved, for a restart
                state.moved = dict(previous.moved)
                if previous.state == "done":
                    state.moved[previous.label] = previous.canary
            state.note(
                "started",
                steps=state.steps,
                step_s=state.step_s,
                guards=state.guards,
                min_requests=min_requests,
            )
            book.states[model] = state
            book.before.pop(model, None)  # another rollout's step
        return asdict(state)

    async def restore(self) -> None:
        """Take the rollouts in force (before serving): with ``shared``, those the workers apply;
        the first to start reads the state folder back (see the module docstring), as one process
        does. A state that cannot be applied (its canary is gone) is logged and left out; never
        raises but for the file system."""
        if self._shared is not None and (published := self._shared.read()) is not None and published.restored:
            self._adopt(published)
            self._shared.acknowledge(published.generation)
            return
        moves: list[tuple[str, str, int]] = []
        async with self._editing() as book:
            if book.restored:
                return
            book.restored = True
            for state in self._read_states():
                try:
                    self._restored(state)
                except Exception as exc:  # e.g. the canary is gone: the server serves as configured
                    log.error("cannot restore the rollout of model %s: %s", state.model, exc)
                    continue
                book.states[state.model] = state
                moves += [(state.model, label, version) for label, version in state.moved.items()]
                if state.state == "done":
                    moves.append((state.model, state.label, state.canary))
        await self._move_labels(moves)

    def follow(self) -> None:
        """Apply the changes other workers published; take over the driving when the driver has
        gone, unless this worker is stopping too (a step would start again only to end). The step
        of the poll that keeps workers in step (nothing without ``shared``)."""
        if self._shared is None:
            return
        book = self._shared.changed()
        if book is not None and book.generation > self._book.generation:
            self._adopt(book)
            self._shared.acknowledge(book.generation)
        if not self._driving and not self._manager.draining and self._try_driving():
            log.info("this worker now runs the rollouts' steps")
            self._drive()

    def _read_states(self) -> list[RolloutState]:
        if self._state_dir is None or not self._state_dir.is_dir():
            return []
        states = []
        for path in sorted(self._state_dir.glob("*.rollout.json")):
            try:
                state = RolloutState(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.error("cannot read rollout state %s: %s", path, exc)
                continue
            if state.model in self._manager.names():
                states.append(state)
        return states

    def _restored(self, state: RolloutState) -> None:
        """Apply the split of a state read back at a restart, ending a running one as its
        ``on_restart`` says, but one whose label was moving, which the driver finishes
        (``restore`` then moves the labels its model's rollouts moved).

        Raises:
            InferdError: it cannot be applied (a finished one's canary is gone, say).
        """
        if state.state == "done":
            self._manager.check_routable(state.model, state.canary)
        elif _finishing(state):
            pass  # its steps passed, or it was promoted: the driver moves its label and ends it
        elif state.state == "running" and state.on_restart == "rollback":
            state.state = "rolled_back"
            state.note("rolled back at restart", step=state.step)
        elif state.state == "running":
            state.note("resumed at restart", step=state.step)
        self._apply(state)

    async def _move_labels(self, moves: list[tuple[str, str, int]]) -> None:
        """Move each (model, label, version) with ``move_label``, after the change that made them
        is published and outside its lock (an admin move may wait for loads and for every worker):
        shielded, so that a caller who gives up does not stop them half-way. A move that fails (its
        version went meanwhile) is logged; the label stays where it was."""
        for model, label, version in moves:
            try:
                await asyncio.shield(self._move_label(model, label, version))
            except InferdError as exc:
                log.error("model %s: label %r cannot move to version %d: %s", model, label, version, exc)
            except Exception:
                log.exception("model %s: moving label %r to version %d failed", model, label, version)

    def _try_driving(self) -> bool:
        assert self._shared is not None
        if self._driver_lock is None:
            self._driver_lock = os.open(
                self._shared.folder / "rollouts.driver", os.O_RDWR | os.O_CREAT, 0o600
            )
        try:
            fcntl.flock(self._driver_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._driving = True
        return True

    @contextlib.asynccontextmanager
    async def _editing(self) -> AsyncIterator[RolloutBook]:
        """The latest book, to change; on a clean exit that changed it, it is published, applied
        here and saved, and (when shared) waited for in every worker. An exception leaves
        everything as it was."""
        async with self._lock:
            if self._shared is None:
                book = copy.deepcopy(self._book)
                yield book
                if book != self._book:
                    book.generation += 1
                    self._commit(book)
                return
            async with self._shared.locked() as published:
                if published is not None and published.generation > self._book.generation:
                    self._adopt(published)  # what other workers changed since this one looked
                    self._shared.acknowledge(published.generation)
                book = copy.deepcopy(self._book)
                yield book
                if book == self._book:
                    return  # nothing changed: nothing to publish, nobody to wait for
                book.generation += 1
                self._shared.publish(book)
                self._commit(book)
                self._shared.acknowledge(book.generation)
        await self._shared.wait_applied(book.generation)

    def _commit(self, book: RolloutBook) -> None:
        """Apply ``book`` and write the states it changed to the state folder."""
        before = self._book
        self._adopt(book)
        for model, state in book.states.items():
            if before.states.get(model) != state:
                self._save(state)

    def _adopt(self, book: RolloutBook) -> None:
        """Make ``book`` the one in force here: set the split and labels of each state that
        changed (an error is logged: the model may be gone); the driver starts and stops its
        step loops to match."""
        old, self._book = self._book, book
        for model, state in book.states.items():
            if old.states.get(model) != state:
                try:
                    self._apply(state)
                except InferdError as exc:
                    log.error("rollout of model %s: cannot apply its %s state: %s", model, state.state, exc)
                except Exception:
                    log.exception("rollout of model %s: cannot apply its %s state", model, state.state)
        if self._driving:
            self._drive()

    def _apply(self, state: RolloutState) -> None:
        """Set the split ``state`` implies in this process (a finished rollout's label is moved
        with ``move_label`` when it finishes).

        Raises:
            InferdError: a version or the model is gone.
        """
        if state.state == "done":
            self._manager.set_traffic(state.model, None)
        elif state.state == "rolled_back":
            self._manager.set_traffic(state.model, {str(state.baseline): 100.0})
        else:
            percent = state.steps[state.step]
            self._manager.set_traffic(
                state.model, {str(state.baseline): 100.0 - percent, str(state.canary): percent}
            )

    async def _move_label_here(self, model: str, label: str, version: int) -> None:
        self._manager.move_label(model, label, version)

    def _drive(self) -> None:
        """Run a step loop for each running rollout, and none for the others (the driver's). A
        loop making a change itself goes on, or hands over when it finds another's (``_run``)."""
        current = asyncio.current_task()
        for model, state in self._book.states.items():
            task = self._tasks.get(model)
            if task is current:
                continue
            alive = task is not None and not task.done()
            if state.state != "running":
                if task is not None and alive:
                    task.cancel()
            elif not alive or self._mine.get(model) != state:
                if task is not None and alive:
                    task.cancel()
                self._mine[model] = copy.deepcopy(state)
                self._tasks[model] = asyncio.get_running_loop().create_task(self._run(model))

    @contextlib.asynccontextmanager
    async def _stepping(self, model: str) -> AsyncIterator[tuple[RolloutBook, RolloutState]]:
        """A step loop's change to its rollout, as ``_editing``.

        Raises:
            _Superseded: someone else changed the rollout since the loop last did, or another
                loop runs it.
        """
        mine = self._mine.get(model)
        ours = None
        try:
            async with self._editing() as book:
                state = book.states.get(model)
                if state is None or state != mine or self._tasks.get(model) is not asyncio.current_task():
                    raise _Superseded
                yield book, state
                ours = self._mine[model] = copy.deepcopy(state)  # before it is published: see _drive
        except _Superseded:
            raise
        except BaseException:
            if ours is not None and self._mine.get(model) is ours:  # not published: as it was
                assert mine is not None  # else the loop had been superseded
                self._mine[model] = mine
            raise

    async def _run(self, model: str) -> None:
        try:
            while True:
                if _finishing(self._mine[model]):
                    await self._finish(model)
                    return
                before = await self._readings(self._mine[model])
                async with self._stepping(model) as (book, state):
                    self._apply(state)  # raises when the model is gone
                    state.note("step", step=state.step, percent=state.steps[state.step])
                    book.before[model] = before
                await asyncio.sleep(state.step_s)
                await self._until_answered(model, before)
                values = await self._values(state, before)
                async with self._stepping(model) as (book, state):
                    state.checked = values
                    failed = _failed([Guard.parse(g) for g in state.guards], values)
                    if failed:
                        state.state = "rolled_back"
                        state.note("rolled back", step=state.step, failed=failed)
                    elif state.step + 1 == len(state.steps):
                        self._manager.check_routable(model, state.canary)  # raises before any change
                        state.note(FINISHING, label=state.label, version=state.canary)
                    else:
                        state.step += 1
                if state.state != "running":
                    return
        except _Superseded:
            self._hand_over(model)
        except Exception:
            log.exception("rollout of model %s failed; rolling back", model)
            try:
                async with self._stepping(model) as (_, state):
                    state.state = "rolled_back"
                    state.note("rolled back", step=state.step, failed=["internal error; see the log"])
            except _Superseded:
                self._hand_over(model)

    async def _finish(self, model: str) -> None:
        """Move the label of a finishing rollout (``move_label``, outside the rollouts' lock: an
        admin move waits for loads an admin call has under way, and for every worker), then end
        it: ``done``, or ``rolled_back`` when the label could not move. Shielded: a loop stopped
        meanwhile leaves the move to finish; the rollout stays finishing, and the next driver
        moves the label again (a move is idempotent) and ends it."""
        state = self._mine[model]
        try:
            await asyncio.shield(self._move_label(model, state.label, state.canary))
            failed = []
        except InferdError as exc:
            failed = [f"label {state.label!r} could not move to version {state.canary}: {exc.message}"]
        async with self._stepping(model) as (_, state):
            if failed:
                state.state = "rolled_back"
                state.note("rolled back", step=state.step, failed=failed)
            else:
                state.state = "done"
                state.note("done", label=state.label, version=state.canary)

    def _hand_over(self, model: str) -> None:
        """End this step loop: the rollout changed under it (resumed, promoted, aborted, or
        started anew), so a new loop runs it if it still runs."""
        if self._tasks.get(model) is asyncio.current_task():
            del self._tasks[model]
        if self._driving:
            self._drive()

    async def _until_answered(self, model: str, before: dict[str, Any]) -> None:
        """Wait, ``step_s`` at a time, until the canary answered ``min_requests`` requests since
        the ``before`` readings; noted once per step when it has to wait."""
        state = self._mine[model]
        answered = (await self._readings(state))["canary"][0] - before["canary"][0]
        if answered >= state.min_requests:
            return
        async with self._stepping(model) as (_, state):
            state.note("waiting for requests", step=state.step, answered=answered, needed=state.min_requests)
        while answered < state.min_requests:
            await asyncio.sleep(state.step_s)
            answered = (await self._readings(state))["canary"][0] - before["canary"][0]

    async def _local_readings(self, state: RolloutState) -> dict[str, Any]:
        """``canary`` and ``baseline``: (requests, failed, latency bucket counts) of each version;
        ``agreement``: (agreeing rows, rows compared) of the shadow; this process's counts."""
        name = state.model
        return {
            "canary": self._metrics.requests_of(name, str(state.canary)),
            "baseline": self._metrics.requests_of(name, str(state.baseline)),
            "agreement": self._agreement(name, state.baseline, state.canary) if self._agreement else (0, 0),
        }

    async def _values(
        self, state: RolloutState, before: dict[str, Any]
    ) -> dict[str, dict[str, float | None]]:
        """Each guard metric of canary and baseline from the readings ``before`` until now
        (None: no observation)."""
        after = await self._readings(state)
        values: dict[str, dict[str, float | None]] = {"canary": {}, "baseline": {}}
        for side in ("canary", "baseline"):
            total_n, failed_n = after[side][0] - before[side][0], after[side][1] - before[side][1]
            window = [a - b for a, b in zip(after[side][2], before[side][2], strict=True)]
            values[side]["error_rate"] = failed_n / total_n if total_n else None
            values[side]["p99_ms"] = _p99_ms(window)
        agreeing = after["agreement"][0] - before["agreement"][0]
        rows = after["agreement"][1] - before["agreement"][1]
        values["canary"]["agreement"] = agreeing / rows if rows else None
        values["baseline"]["agreement"] = 1.0
        return {metric: {side: values[side][metric] for side in values} for metric in METRICS}

    def _save(self, state: RolloutState) -> None:
        if self._state_dir is None:
            return
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
            path = self._state_dir / f"{state.model}.rollout.json"
            staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            staging.write_text(json.dumps(asdict(state), indent=1))
            staging.replace(path)
        except OSError as exc:
            log.error("cannot write the rollout state of model %s: %s", state.model, exc)


def _finishing(state: RolloutState) -> bool:
    """Whether ``state``'s label is moving: it stays ``running``, and takes no command, until done."""
    return state.state == "running" and bool(state.history) and state.history[-1]["event"] == FINISHING


def _failed(guards: Sequence[Guard], values: dict[str, dict[str, float | None]]) -> list[str]:
    """The guards that ``values`` (a step's metrics) fail, each with its reading."""
    failed = []
    for guard in guards:
        canary, baseline = values[guard.metric]["canary"], values[guard.metric]["baseline"]
        if not guard.holds(canary, baseline):
            reading = f"{guard}: canary {canary:.4g}"
            failed.append(reading + (f", baseline {baseline:.4g}" if baseline is not None else ""))
    return failed


class RolloutClient:
    """Drives the rollouts of a running server through its admin routes, from another process:
    what ``inferd rollout`` and ``inferd select --promote ... --canary`` use.

    Args:
        url: the server's REST address, e.g. ``http://127.0.0.1:8501``.
        admin_token: the server's ``--admin_token`` ("" when it has none).
        timeout_s: per HTTP call.
    """

    def __init__(self, url: str, admin_token: str, timeout_s: float = 30.0) -> None:
        self._base = f"{url.rstrip('/')}/v2/repository/models"
        self._headers = {"content-type": "application/json", "authorization": f"Bearer {admin_token}"}
        self._timeout_s = timeout_s

    def command(self, model: str, action: str, document: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST ``action`` (one of ``ACTIONS``) for ``model``; the rollout's status afterwards.

        Raises:
            InferdError: the server refused (its status's error, with its message), or it could
                not be reached (Unavailable).
        """
        import urllib.error
        import urllib.request

        url = f"{self._base}/{model}/rollout" + ("" if action == "start" else f"/{action}")
        body = json.dumps(document or {}).encode()
        request = urllib.request.Request(url, body, self._headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                text = str(json.loads(text)["error"])
            kind = _HTTP_ERRORS.get(exc.code, Internal)
            raise kind(f"{action} rollout of model {model}: the server answered {exc.code}: {text}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unavailable(f"{action} rollout of model {model}: cannot reach {url}: {exc}") from None

    def follow(
        self, model: str, state: dict[str, Any], poll_s: float, show: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Poll the rollout's status every ``poll_s`` seconds until it is neither running nor
        paused, calling ``show`` with each new history event; its last status.

        Raises:
            InferdError: as ``command``.
        """
        shown = 0
        while True:
            for event in state["history"][shown:]:
                show(event)
            shown = len(state["history"])
            if state["state"] not in ("running", "paused"):
                return state
            time.sleep(poll_s)
            state = self.command(model, "status")


_HTTP_ERRORS: dict[int, type[InferdError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    503: Unavailable,
}


def describe(event: dict[str, Any]) -> str:
    """One line for a history event: its local time, name and details."""
    detail = {k: v for k, v in event.items() if k not in ("time", "event")}
    return (
        f"{time.strftime('%H:%M:%S', time.localtime(event['time']))} {event['event']} {detail or ''}".rstrip()
    )


def _p99_ms(buckets: list[int]) -> float | None:
    """The 99th percentile of a latency histogram's bucket counts, in ms, placed linearly inside
    its bucket (as ``histogram_quantile``; past the last bound, that bound); None without
    requests."""
    count = sum(buckets)
    if not count:
        return None
    rank, seen, lower = 0.99 * count, 0, 0.0
    for bound, n in zip(LATENCY_BUCKETS_S, buckets, strict=False):
        if n and seen + n >= rank:
            return (lower + (bound - lower) * (rank - seen) / n) * 1000
        seen, lower = seen + n, bound
    return lower * 1000
