"""ModelControl: keeps the manager in step with the repository, and the admin operations.

The poll loop calls ``poll``, startup ``sync``; the admin APIs (the V2 model repository
extension, TF Serving's HandleReloadConfigRequest) call ``index``, ``load``, ``unload`` and
``reload_config``. Scans take one lock, so a scan never runs beside another, but they do not wait
for loads: each model is reconciled in a task of its own, so a model that takes minutes to load
delays neither the next scan nor another model's new version, and an admin call waits only for
the model it names. A model's reconciles run one after another (a newer plan replaces one still
waiting), so loads of one model are serialized; loads of different models share the manager's
bounded load pool (``--num_load_threads``). Call from the event loop's thread.

What admin calls change (models unloaded, load overrides, moved labels, a replaced model config)
is one ``AdminState``. Each call computes the new state, publishes it, then applies it. Under
``--workers N`` it is published to an ``AdminStateFile`` that every worker follows, so a call made
through one worker takes effect in all of them (and in a worker restarted later).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.config import BatchingParameters, ModelConfig, ModelSettings
from inferd.errors import ConfigError, InvalidArgument, ModelLoadError, NotFound, Unavailable
from inferd.manager import ModelManager
from inferd.repository import ModelPlan, Repository
from inferd.shared_state import SharedState
from inferd.types import ModelRef, VersionState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index: a model, or one version of it, and its state."""

    name: str
    version: str
    state: VersionState | None  # None: configured but unloaded by an admin
    reason: str


@dataclass(frozen=True, slots=True)
class SettingsOverride:
    """Settings an admin load gives a model over its ``inferd.toml`` (Triton's load with a config):
    None leaves a setting as the file has it. It lasts until the next load of the model."""

    max_batch_size: int | None = None
    batch_timeout_micros: int | None = None

    def apply(self, settings: ModelSettings) -> ModelSettings:
        """``settings`` with this override's batching; batching starts from inferd's defaults
        when the file has no ``[batching]``.

        Raises:
            ConfigError: the result is not valid batching (e.g. ``allowed_batch_sizes`` in the
                file no longer ends at ``max_batch_size``).
        """
        if self.max_batch_size is None and self.batch_timeout_micros is None:
            return settings
        batching = settings.batching or BatchingParameters()
        batching = dataclasses.replace(
            batching,
            max_batch_size=batching.max_batch_size if self.max_batch_size is None else self.max_batch_size,
            batch_timeout_micros=(
                batching.batch_timeout_micros
                if self.batch_timeout_micros is None
                else self.batch_timeout_micros
            ),
        )
        return dataclasses.replace(settings, batching=batching)


@dataclass(slots=True)
class AdminState:
    """What admin calls changed, as a whole: the server's plan is the repository's with this on
    top. ``generation`` counts the publications (0: none yet). ``models`` replaces ``replaced``
    (the configured models then) until the polled model config file lists other models (as
    ``Repository`` says); the worker that sees it first publishes the end (``models`` None), so
    that a worker started later does not bring them back."""

    generation: int = 0
    unloaded: frozenset[str] = frozenset()
    overrides: dict[str, SettingsOverride] = field(default_factory=dict)
    moved: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> label -> version
    models: list[ModelConfig] | None = None  # a reload_config's models; None: the configured ones
    replaced: list[ModelConfig] | None = None  # the configured models that ``models`` replaced
    # What the call that published this state did, not copied to the next call's state:
    trusted: frozenset[str] = frozenset()  # models whose new files it vouched for (a load)
    reloaded: bool = False  # it replaced the models (reload_config)

    def copy(self) -> AdminState:
        """A copy whose containers can be changed without touching this one."""
        return AdminState(
            self.generation,
            self.unloaded,
            dict(self.overrides),
            {name: dict(labels) for name, labels in self.moved.items()},
            None if self.models is None else list(self.models),
            None if self.replaced is None else list(self.replaced),
        )


AdminStateFile = SharedState[AdminState]
"""The ``AdminState`` shared by the workers of one server (``shared_state``)."""


class ModelControl:
    """Reconciles ``manager`` to ``repository``, minus the models an admin unloaded. With
    ``shared``, admin changes are published there and the ones other workers publish are applied
    by ``follow``."""

    def __init__(
        self, repository: Repository, manager: ModelManager[Any], shared: AdminStateFile | None = None
    ) -> None:
        self._repository = repository
        self._manager = manager
        self._shared = shared
        self._state = AdminState()
        self._unloaded: set[str] = set()
        self._configured: list[str] = []  # every model the last scan planned, by name
        self._overrides: dict[str, SettingsOverride] = {}
        self._moved: dict[str, dict[str, int]] = {}  # labels admin calls moved: model -> label -> version
        self._lock = asyncio.Lock()  # held while scanning and while an admin call changes the plan
        self._pending: dict[str, ModelPlan | None] = {}  # per model, the next plan (None: remove)
        self._runs: dict[str, asyncio.Task[None]] = {}  # per model, the task applying its plans

    async def sync(self, trusted: frozenset[str] = frozenset()) -> None:
        """Scan the repository (in a thread), reconcile the manager to it, and wait until every
        model's reconcile is done.

        Raises:
            ConfigError: the model configuration cannot be read (at the first scan only).
        """
        async with self._lock:
            if self._shared is not None and (state := self._shared.read()) is not None:
                self._set(state, starting=True)  # a worker (re)started after admin calls: as the others
            runs = await self._scan(trusted)
        await _settled(runs.values())
        if self._shared is not None:
            self._shared.acknowledge(self._state.generation)

    async def follow(self) -> None:
        """Apply the admin state another worker published, if it changed since (the step of the
        poll that keeps workers in step; nothing without ``shared``)."""
        if self._shared is None:
            return
        state = self._shared.changed()
        if state is None or state.generation <= self._state.generation:
            return
        async with self._lock:
            if state.generation > self._state.generation:
                await self._adopt(state)
        self._shared.acknowledge(self._state.generation)

    async def poll(self) -> None:
        """Scan the repository and start reconciling the models that changed, without waiting for
        their loads: the poll loop's step. Publishes the end of a ``reload_config``'s models when
        the model config file changed since."""
        async with self._lock:
            await self._scan()
        if self._state.models is not None and not self._repository.replacing:
            await self._end_reload()

    async def _end_reload(self) -> None:
        """Publish that the model config file ended the ``reload_config`` models in force (the
        scan that found it reconciled already)."""
        async with self._admin() as state:
            if state.models is None or self._repository.replacing:
                return  # another worker published it, or a newer reload holds
            state.models = state.replaced = None
            state.generation = self._state.generation + 1
            if self._shared is not None:
                self._shared.publish(state)
                self._shared.acknowledge(state.generation)
            self._set(state)

    async def _scan(self, trusted: frozenset[str] = frozenset()) -> dict[str, asyncio.Task[None]]:
        """Scan, then queue each model's plan (and the removal of models no longer planned) on
        that model's task; returns the tasks by model name. Call holding the lock."""
        plans = [self._overridden(plan) for plan in await asyncio.to_thread(self._repository.scan, trusted)]
        self._configured = sorted(plan.name for plan in plans)
        wanted: dict[str, ModelPlan | None] = {
            plan.name: plan for plan in plans if plan.name not in self._unloaded
        }
        for name in (set(self._manager.names()) | set(self._runs)) - set(wanted):
            wanted[name] = None
        return {name: self._queue(name, plan) for name, plan in wanted.items()}

    def _queue(self, name: str, plan: ModelPlan | None) -> asyncio.Task[None]:
        self._pending[name] = plan
        run = self._runs.get(name)
        if run is None or run.done():
            run = self._runs[name] = asyncio.create_task(self._apply(name), name=f"reconcile {name}")
        return run

    async def _apply(self, name: str) -> None:
        """Apply ``name``'s queued plans, the newest each time, until none is left."""
        while name in self._pending:
            plan = self._pending.pop(name)
            try:
                if plan is None:
                    await self._manager.remove(name)
                else:
                    await self._manager.reconcile(plan)
            except Exception:  # the manager reports load failures itself; this is a bug
                log.exception("reconciling model %s failed", name)
        if self._runs.get(name) is asyncio.current_task():
            del self._runs[name]

    def summary(self) -> tuple[int, str]:
        """What serves now, for the log: a level and a line naming each configured model with
        its AVAILABLE versions and, for each that has none, why (no version folder and how to
        make one, or each version's load error). INFO when every model serves, WARNING when
        some do not, ERROR when none does."""
        unversioned = self._repository.why_unversioned()
        served, unserved = [], []
        for name in self._configured:
            if name in self._unloaded:
                unserved.append(f"{name} (unloaded by an admin)")
                continue
            try:
                statuses = self._manager.status(ModelRef(name))
            except NotFound:
                statuses = []
            available = sorted(s.version for s in statuses if s.state is VersionState.AVAILABLE)
            if available:
                plural = "s" if len(available) > 1 else ""
                served.append(f"{name} (version{plural} {', '.join(map(str, available))})")
                continue
            failed = [f"version {s.version}: {s.error_message}" for s in statuses if s.error_message]
            why = unversioned.get(name) or "; ".join(failed) or "no version loaded yet"
            unserved.append(f"{name} ({why})")
        if not unserved:
            return logging.INFO, f"serving {', '.join(served)}"
        if not served:
            return logging.ERROR, f"no model loaded: {', '.join(unserved)}"
        return logging.WARNING, f"serving {', '.join(served)}; not serving {', '.join(unserved)}"

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every configured model's versions and states, by name; ``ready_only`` keeps the
        AVAILABLE ones."""
        entries = []
        for name in self._configured:
            if name in self._unloaded:
                entries.append(IndexEntry(name, "", None, "unloaded"))
                continue
            try:
                statuses = self._manager.status(ModelRef(name))
            except NotFound:
                statuses = []
            entries.extend(IndexEntry(name, str(s.version), s.state, s.error_message) for s in statuses)
        if ready_only:
            entries = [e for e in entries if e.state is VersionState.AVAILABLE]
        return entries

    def _overridden(self, plan: ModelPlan) -> ModelPlan:
        moved = self._moved.get(plan.name)  # moved by an admin call in another worker too
        if moved:
            plan = dataclasses.replace(plan, labels={**plan.labels, **moved})
        override = self._overrides.get(plan.name)
        if override is None:
            return plan
        try:
            return dataclasses.replace(plan, settings=override.apply(plan.settings))
        except ConfigError as exc:
            return dataclasses.replace(plan, error=f"the load's config override: {exc.message}")

    async def load(self, name: str, override: SettingsOverride | None = None) -> None:
        """Serve ``name`` again if it was unloaded, and load its new versions now, without
        waiting for the files to look stable, and the versions that failed to load again. An
        ``override`` different from the one in force (a load without one returns to
        ``inferd.toml``) reloads the versions serving, with the new settings: they are out of
        service until the reload finished. Under a memory budget the latest version, listed
        cold, is loaded now; the call waits for it at most ``--load_wait_ms`` (the load goes on).

        Raises:
            NotFound: ``name`` is not a configured model.
            InvalidArgument: ``override`` does not fit the model's settings.
            ModelLoadError: no version of it is AVAILABLE afterwards; the message says why.
        """
        async with self._admin() as state:
            if name not in self._configured:  # a model folder added since the last scan, as Triton
                await self._configured_now()  # polls the repository for the model it loads
            self._require_configured(name)
            if override is not None:
                try:
                    override.apply(self._repository_settings(name))
                except ConfigError as exc:
                    raise InvalidArgument(f"the config does not fit model {name!r}: {exc.message}") from None
                state.overrides[name] = override
            else:
                state.overrides.pop(name, None)
            state.unloaded -= {name}
            state.trusted = frozenset({name})
            await self._commit(state)
        # Under a memory budget the model is listed cold: load it now.
        with (
            contextlib.suppress(NotFound, Unavailable),
            await self._manager.acquire(ModelRef(name), use=False),
        ):
            pass
        if not self._manager.serves(name):
            try:
                statuses = self._manager.status(ModelRef(name))
            except NotFound:
                raise ModelLoadError(f"model {name!r} has no version folders to load") from None
            reasons = "; ".join(f"version {s.version}: {s.error_message}" for s in statuses)
            raise ModelLoadError(f"failed to load model {name!r}: {reasons}")

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (in-flight requests finish) until ``load`` names it again.

        Raises:
            NotFound: ``name`` is not a configured model.
        """
        async with self._admin() as state:
            self._require_configured(name)
            state.unloaded |= {name}
            await self._commit(state)

    def labels(self, name: str) -> dict[str, int]:
        """Where the labels of model ``name`` point now (label -> version)."""
        return self._manager.labels(name)

    def residency(self) -> tuple[dict[tuple[str, int], int], list[dict[str, Any]]]:
        """Memory now: bytes charged to each loaded version by (model, version), and per device
        with a budget or a charge, ``device``, ``used_bytes`` and ``limit_bytes`` (None: no budget)."""
        resident = {(name, int(version)): nbytes for name, version, nbytes in self._manager.resident_bytes()}
        budget = self._manager.residency.budget
        devices = [
            {"device": device, "used_bytes": budget.used(device), "limit_bytes": budget.limit(device)}
            for device in budget.devices()
        ]
        return resident, devices

    def split(self, name: str) -> dict[str, float]:
        """Model ``name``'s traffic split now: version -> percent of the requests that name no
        version; empty when it is not split."""
        split = self._manager.split(name)
        return split.percents() if split else {}

    async def move_label(self, name: str, label: str, version: int) -> None:
        """Point ``label`` of model ``name`` at ``version`` (a rollback, or a promotion) until the
        server restarts, through ``ModelManager.move_label`` (what a finished rollout calls too);
        the repository's own labels for other names still apply.

        Raises:
            NotFound: ``name`` is not a configured model, or it is not served now.
            InvalidArgument: ``version`` is not AVAILABLE, so the label could not move.
        """
        async with self._admin() as state:
            self._require_configured(name)
            # here at once (raises before any change); the other workers by the state's plans
            self._manager.move_label(name, label, version)
            state.moved.setdefault(name, {})[label] = version
            await self._commit(state)

    async def reload_config(self, models: list[ModelConfig]) -> None:
        """Serve exactly ``models`` from now on (see ``Repository.replace_models``), and answer
        once they are loaded; a model an admin unloaded is served again if it is named.

        Raises:
            ModelLoadError: the config is in force, but these models have no version AVAILABLE.
        """
        async with self._admin() as state:
            before = {
                m.name: _where(m.base_path) for m in await asyncio.to_thread(self._repository.model_configs)
            }
            state.models = list(models)
            state.replaced = self._repository.configured()
            state.reloaded = True
            state.unloaded = frozenset()
            # The caller vouches for the files of the models it adds or moves, as a load does:
            # they are loaded now, not after a second scan finds them unchanged. A model that
            # stays where it was is scanned as before (a version being written there waits).
            state.trusted = frozenset(m.name for m in models if before.get(m.name) != _where(m.base_path))
            await self._commit(state)
        failed = [m.name for m in models if not self._manager.serves(m.name)]
        if failed:
            raise ModelLoadError(
                f"the new config is in force, but no version of {failed} could be loaded; see GetModelStatus"
            )

    @contextlib.asynccontextmanager
    async def _admin(self) -> AsyncIterator[AdminState]:
        """Hold the lock (the workers' lock too, when shared) and yield a copy of the admin state
        in force, the latest any worker published, for an admin call to change and ``_commit``."""
        if self._shared is None:
            async with self._lock:
                yield self._state.copy()
            return
        # The workers' lock first: waiting for it, this worker still follows the others' calls.
        async with self._shared.locked() as published, self._lock:
            latest = published or AdminState()
            if latest.generation > self._state.generation:
                await self._adopt(latest)  # start from what the other workers serve
            yield self._state.copy()

    async def _commit(self, state: AdminState) -> None:
        """Publish ``state`` and apply it; when shared, wait until every worker applied it."""
        state.generation = self._state.generation + 1
        if self._shared is not None:
            self._shared.publish(state)
        await self._adopt(state)
        if self._shared is not None:
            self._shared.acknowledge(state.generation)
            await self._shared.wait_applied(state.generation)

    def _set(self, state: AdminState, starting: bool = False) -> None:
        """Make ``state`` the one in force, without reconciling; its models replace the configured
        ones when its call replaced them, or when this worker is ``starting`` (unless the model
        config file changed since: see ``Repository``)."""
        if state.models is not None and (state.reloaded or starting):
            self._repository.replace_models(state.models, state.replaced)
        self._state = state
        self._unloaded = set(state.unloaded)
        self._overrides = dict(state.overrides)
        self._moved = {name: dict(labels) for name, labels in state.moved.items()}
        self._manager.pin_labels(self._moved)  # over the pins of moves made here before

    async def _adopt(self, state: AdminState) -> None:
        """Apply ``state``: versions loaded with settings it overrides differently are retired
        first and loaded again; waits for the models it changed. Call holding the lock."""
        old = self._state
        retire = {
            n
            for n in old.overrides.keys() | state.overrides.keys()
            if old.overrides.get(n) != state.overrides.get(n)
        }
        moved = {n for n in old.moved.keys() | state.moved.keys() if old.moved.get(n) != state.moved.get(n)}
        touched = retire | moved | (old.unloaded ^ state.unloaded) | state.trusted
        everything = state.reloaded
        self._set(state)
        if retire:  # retire the versions loaded with the old settings
            self._unloaded |= retire
            runs = await self._scan()
            await _settled(run for model, run in runs.items() if model in retire)
            self._unloaded = set(state.unloaded)
        for name in state.trusted:  # vouched for: loaded again, also where a load failed before
            self._manager.retry_failed(name)
        runs = await self._scan(state.trusted)
        await _settled(run for model, run in runs.items() if everything or model in touched)

    def _repository_settings(self, name: str) -> ModelSettings:
        plan = self._repository.plan(name)
        return plan.settings if plan is not None else ModelSettings()

    async def _configured_now(self) -> None:
        """Read the configured models again (in a thread); call holding the lock."""
        models = await asyncio.to_thread(self._repository.model_configs)
        self._configured = sorted({*self._configured, *(m.name for m in models)})

    def _require_configured(self, name: str) -> None:
        if name not in self._configured:
            raise NotFound(f"model {name!r} is not in the model repository")


def _where(base_path: Path | str) -> Path | str:
    """A base path to compare: a folder made absolute, an object-store URI as it is."""
    return base_path.absolute() if isinstance(base_path, Path) else base_path


async def _settled(runs: Iterable[asyncio.Task[None]]) -> None:
    """Wait for ``runs`` to finish. Shielded: a caller that gives up (a client's deadline, a
    cancelled admin call) leaves the loads running. The runs handle their own errors; a run
    cancelled at exit (Ctrl-C while they load) is not reported as an error nobody retrieved."""
    runs = list(runs)
    if runs:
        await asyncio.shield(asyncio.gather(*runs, return_exceptions=True))
