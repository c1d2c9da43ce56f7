"""ModelManager: loads, serves and unloads model versions, preserving availability.

The manager is generic over what it loads: its loader turns a version folder into a servable (a
thing with ``close()``, and optionally ``supervise()``; in a server, ``servable.Servable``, which
warms the model up before it is returned). Reconciling a model to a plan loads each new aspired
version in a loader thread and only then marks it AVAILABLE and routes to it. Versions that
are no longer aspired are unloaded once an aspired version is AVAILABLE (or when no version is
aspired at all), and only after their last lease is returned (``retired_versions``). A version
that fails to load ends in state END with its error, and the versions already serving keep
serving. A version whose
worker process dies (``isolation = "process"``) ends in state END with the reason at once, is
closed when its last lease is returned, and is loaded again at the next reconcile. A label moves to
its new version only once that version is AVAILABLE; until then it keeps its old one, which stays
loaded for it even when no longer aspired (``routed_labels``).

``drain`` starts a shutdown: readiness goes false, every version reports UNLOADING, new leases
are refused with UNAVAILABLE, and ``drained`` waits for the leases already held.

The manager is not thread-safe: call it from the event loop's thread. Loading and closing run in
the executor given to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from inferd.config import ModelSettings
from inferd.errors import InferdError, ModelLoadError, NotFound, Unavailable, UnknownLabel
from inferd.metrics import Metrics
from inferd.repository import ModelPlan, VersionSource
from inferd.runtimes import Supervised
from inferd.traffic import Split, resolve
from inferd.types import ModelId, ModelRef, VersionState, VersionStatus

log = logging.getLogger(__name__)

_DRAIN_POLL_S = 0.02


class Closeable(Protocol):
    """What a loader returns: closed once, in the executor, when no lease holds it. A servable
    that also satisfies ``runtimes.Supervised`` reports the death of its worker process."""

    def close(self) -> None: ...


S = TypeVar("S", bound=Closeable)

Loader = Callable[[ModelId, Path, ModelSettings, str | None], S]
"""Loads one version folder (its id, path, settings and the platform the config names) in a
load thread; raises ``InferdError`` (or anything) when it cannot."""


@dataclass(slots=True, eq=False)
class ServedVersion(Generic[S]):
    """One version's state. ``servable`` is set once loading finished and until it is closed."""

    id: ModelId
    source: VersionSource
    settings: ModelSettings
    state: VersionState = VersionState.START
    servable: S | None = None
    error_code: str = "OK"
    error_message: str = ""
    leases: int = 0
    died: bool = False

    def status(self) -> VersionStatus:
        return VersionStatus(self.id.version, self.state, self.error_code, self.error_message)


@dataclass(slots=True, eq=False)
class _Entry(Generic[S]):
    versions: dict[int, ServedVersion[S]] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    """Label -> the version it should move to once that one is AVAILABLE."""
    latest: ServedVersion[S] | None = None
    settings: ModelSettings = field(default_factory=ModelSettings)
    """The model's ``inferd.toml`` as of the last plan that could read it."""
    weights: Mapping[str, float] = field(default_factory=dict)
    """The ``[traffic]`` table of the last plan that could be read."""
    override: Mapping[str, float] | None = None
    """Weights set by ``set_traffic`` (a rollout); they win over ``weights`` while set."""
    split: Split | None = None
    moved: dict[str, int] = field(default_factory=dict)
    """Labels set by ``move_label`` (a finished rollout); they win over the plan's."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def refresh_latest(self) -> None:
        available = [v for v in self.versions.values() if v.state is VersionState.AVAILABLE]
        self.latest = max(available, key=lambda v: v.id.version, default=None)


class Lease(Generic[S]):
    """Holds a version in service while a request uses it; use as a context manager."""

    __slots__ = ("_manager", "_version")

    def __init__(self, manager: ModelManager[S], version: ServedVersion[S]) -> None:
        self._manager = manager
        self._version = version

    def __enter__(self) -> ServedVersion[S]:
        self._version.leases += 1
        return self._version

    def __exit__(self, *exc: object) -> None:
        version = self._version
        version.leases -= 1
        if (
            version.leases == 0
            and version.state is not VersionState.AVAILABLE
            and version.servable is not None
        ):
            self._manager._close_later(version)


class ModelManager(Generic[S]):
    """Owns every served model version and closes it; see the module docstring for the lifecycle.

    Args:
        executor: where loads and closes run.
        loader: makes a servable of a version folder; called in ``executor``.
        metrics: where load durations and failures are counted; by default a collector of its own.
    """

    def __init__(self, executor: Executor, loader: Loader[S], metrics: Metrics | None = None) -> None:
        self._executor = executor
        self._loader = loader
        self._metrics = metrics or Metrics()
        self._models: dict[str, _Entry[S]] = {}
        self._closing: set[asyncio.Future[Any]] = set()
        self._draining = False

    def names(self) -> list[str]:
        return sorted(self._models)

    async def apply(self, plans: Iterable[ModelPlan]) -> None:
        """Reconcile every model to its plan; models without a plan are unloaded and removed."""
        plans = list(plans)
        wanted = {plan.name for plan in plans}
        for name in [n for n in self._models if n not in wanted]:
            await self.remove(name)
        await asyncio.gather(*(self.reconcile(plan) for plan in plans))

    async def remove(self, name: str) -> None:
        """Stop serving model ``name`` and forget it: its versions unload once their requests
        finish (after a load of it in progress ends). Nothing happens for an unknown name."""
        entry = self._models.pop(name, None)
        if entry is None:
            return
        log.info("model %s is no longer configured; unloading it", name)
        async with entry.lock:
            for version in list(entry.versions.values()):
                self._retire(entry, version)

    async def reconcile(self, plan: ModelPlan) -> None:
        """Load the plan's new versions, then retire versions it no longer aspires to."""
        entry: _Entry[S] = self._models.setdefault(plan.name, _Entry())
        async with entry.lock:
            for number in sorted(plan.aspired, reverse=True):
                if self._needs_load(entry.versions.get(number), plan.aspired[number]):
                    await self._load(entry, plan, plan.aspired[number])
            self._move_labels(plan.name, entry, {**plan.labels, **entry.moved})
            if plan.error is None:
                entry.settings, entry.weights = plan.settings, plan.settings.traffic
            self._resplit(plan.name, entry)
            states = {number: version.state for number, version in entry.versions.items()}
            held = {entry.labels[label] for label in entry.held}
            for number in retired_versions(states, plan.aspired, held):
                self._retire(entry, entry.versions[number])

    @staticmethod
    def _move_labels(name: str, entry: _Entry[S], wanted: Mapping[str, int]) -> None:
        """Route labels by ``routed_labels``, warning when a label starts being held."""
        available = {n for n, v in entry.versions.items() if v.state is VersionState.AVAILABLE}
        labels, held = routed_labels(wanted, entry.labels, available)
        for label, number in held.items():
            if entry.held.get(label) != number:
                log.warning(
                    "label %r of model %s stays on version %d until version %d is available",
                    label,
                    name,
                    labels[label],
                    number,
                )
        entry.labels, entry.held = labels, held

    @staticmethod
    def _resplit(name: str, entry: _Entry[S]) -> None:
        """Resolve the entry's traffic weights against its labels (after labels moved)."""
        weights = entry.override if entry.override is not None else entry.weights
        split = resolve(weights, entry.labels)
        if weights and split is None:
            log.warning(
                "model %s: [traffic] %s names a label that does not exist; not split", name, dict(weights)
            )
        if split != entry.split:
            log.info("model %s: traffic split %s", name, dict(split.shares) if split else "off")
        entry.split = split

    def set_traffic(self, name: str, weights: Mapping[str, float] | None) -> None:
        """Set (or with None, drop) weights that win over the model's ``[traffic]`` table.

        Raises:
            NotFound: unknown model.
        """
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"Could not find any versions of model {name}")
        entry.override = None if weights is None else dict(weights)
        self._resplit(name, entry)

    def move_label(self, name: str, label: str, version: int) -> None:
        """Point ``label`` at AVAILABLE ``version`` now and at every later reconcile, whatever the
        plan says (a finished rollout).

        Raises:
            NotFound: unknown model, or the version is not AVAILABLE.
        """
        entry = self._models.get(name)
        served = entry.versions.get(version) if entry else None
        if entry is None or served is None or served.state is not VersionState.AVAILABLE:
            raise NotFound(f"version {version} of model {name} is not available")
        entry.moved[label] = version
        entry.labels = {**entry.labels, label: version}
        entry.held.pop(label, None)
        self._resplit(name, entry)

    def labels(self, name: str) -> dict[str, int]:
        """Where model ``name``'s labels point now; empty for an unknown model."""
        entry = self._models.get(name)
        return dict(entry.labels) if entry else {}

    def settings(self, name: str) -> ModelSettings | None:
        """Model ``name``'s ``inferd.toml`` as last read (re-read at each poll); None if unknown."""
        entry = self._models.get(name)
        return entry.settings if entry else None

    def split(self, name: str) -> Split | None:
        """The traffic split of model ``name`` now; None when unsplit or unknown."""
        entry = self._models.get(name)
        return entry.split if entry else None

    @staticmethod
    def _needs_load(current: ServedVersion[S] | None, source: VersionSource) -> bool:
        if current is None or current.state is VersionState.UNLOADING:
            return True
        if current.state is VersionState.END:
            # A version that failed to load is retried only when its files changed.
            return (
                current.error_code == "OK" or current.died or current.source.fingerprint != source.fingerprint
            )
        return False

    async def _load(self, entry: _Entry[S], plan: ModelPlan, source: VersionSource) -> None:
        version: ServedVersion[S] = ServedVersion(
            ModelId(plan.name, source.version), source, plan.settings, VersionState.LOADING
        )
        entry.versions[source.version] = version
        log.info("loading %s from %s", version.id, source.path)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            if plan.error:
                raise ModelLoadError(plan.error)
            servable = await loop.run_in_executor(
                self._executor, self._loader, version.id, source.path, plan.settings, plan.platform
            )
        except InferdError as exc:
            self._fail(version, exc.code.grpc_code, exc.message)
        except Exception as exc:  # a runtime's unexpected failure must not stop the server
            log.exception("loading %s failed unexpectedly", version.id)
            self._fail(version, "UNKNOWN", f"{type(exc).__name__}: {exc}")
        else:
            version.servable, version.state = servable, VersionState.AVAILABLE
            if isinstance(servable, Supervised):

                def died(reason: str) -> None:  # called from the worker's reader thread
                    loop.call_soon_threadsafe(self._died, entry, version, reason)

                servable.supervise(str(version.id), died)
            entry.refresh_latest()
            log.info("%s is AVAILABLE: %s", version.id, servable)
        ok = version.state is VersionState.AVAILABLE
        self._metrics.model_loaded(plan.name, time.monotonic() - started, ok)

    @staticmethod
    def _fail(version: ServedVersion[S], code: str, message: str) -> None:
        version.state, version.error_code, version.error_message = VersionState.END, code, message
        log.error("%s failed to load: %s", version.id, message)

    def _died(self, entry: _Entry[S], version: ServedVersion[S], reason: str) -> None:
        """The version's worker process died: out of service now, closed once no request holds it."""
        if version.servable is None or version.state is VersionState.END:
            return  # already being closed
        version.state, version.error_code, version.error_message = VersionState.END, "INTERNAL", reason
        version.died = True
        entry.refresh_latest()
        if version.leases == 0:
            self._close_later(version)

    def _retire(self, entry: _Entry[S], version: ServedVersion[S]) -> None:
        if version.state is not VersionState.AVAILABLE:
            return
        version.state = VersionState.UNLOADING
        entry.refresh_latest()
        log.info("unloading %s once its %d in-flight request(s) finish", version.id, version.leases)
        if version.leases == 0:
            self._close_later(version)

    def _close_later(self, version: ServedVersion[S]) -> None:
        servable, version.servable = version.servable, None
        future = asyncio.get_running_loop().run_in_executor(self._executor, _close, servable)
        self._closing.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._closing.discard(f)
            version.state = VersionState.END
            log.info("%s unloaded", version.id)

        future.add_done_callback(done)

    def lease(self, ref: ModelRef, key: str | None = None) -> Lease[S]:
        """A lease on the version ``ref`` asks for; use it as a context manager. A ref that names
        neither version nor label goes by the model's traffic split when it has one (by ``key``,
        the request's traffic key, when given), else to the latest version.

        Raises:
            NotFound: unknown model, version or label, or the version is not AVAILABLE.
            Unavailable: the server is shutting down.
        """
        if self._draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        entry = self._models.get(ref.name)
        if entry is None:
            raise NotFound(f"Servable not found for request: Latest({ref.name})")
        if ref.version is not None:
            version = entry.versions.get(ref.version)
            if version is None or version.state is not VersionState.AVAILABLE:
                raise NotFound(f"Servable not found for request: Specific({ref.name}, {ref.version})")
        elif ref.label is not None:
            number = entry.labels.get(ref.label)
            if number is None:
                raise UnknownLabel(f"Unrecognized servable version label: {ref.label}")
            version = entry.versions.get(number)
            if version is None or version.state is not VersionState.AVAILABLE:
                raise NotFound(
                    f"label {ref.label!r} of model {ref.name!r} points to version {number}, "
                    "which is not available"
                )
        else:
            version = entry.latest
            if entry.split is not None:
                available = [n for n, v in entry.versions.items() if v.state is VersionState.AVAILABLE]
                chosen = entry.split.choose(key, available)
                if chosen is not None:
                    version = entry.versions[chosen]
            if version is None:
                raise NotFound(f"Servable not found for request: Latest({ref.name})")
        return Lease(self, version)

    def status(self, ref: ModelRef) -> list[VersionStatus]:
        """Every version seen of a model, highest first; narrowed by ``ref``'s version or label.

        Raises:
            NotFound: unknown model, version or label.
        """
        entry = self._models.get(ref.name)
        if entry is None or not entry.versions:
            raise NotFound(f"Could not find any versions of model {ref.name}")
        number = ref.version
        if ref.label is not None:
            number = entry.labels.get(ref.label)
            if number is None:
                raise UnknownLabel(f"Unrecognized servable version label: {ref.label}")
        if number is not None:
            if number not in entry.versions:
                raise NotFound(f"Could not find version {number} of model {ref.name}")
            numbers = [number]
        else:
            numbers = sorted(entry.versions, reverse=True)
        statuses = [entry.versions[v].status() for v in numbers]
        if self._draining:
            unloading = VersionState.UNLOADING
            statuses = [
                replace(s, state=unloading) if s.state is VersionState.AVAILABLE else s for s in statuses
            ]
        return statuses

    def serves(self, name: str) -> bool:
        """True when model ``name`` has an AVAILABLE version."""
        entry = self._models.get(name)
        return entry is not None and entry.latest is not None

    def ready(self) -> bool:
        """True when every configured model has an AVAILABLE version and no drain has begun."""
        return not self._draining and all(entry.latest is not None for entry in self._models.values())

    def drain(self) -> None:
        """Begin a shutdown: not ready, every version UNLOADING in its status, new leases refused."""
        self._draining = True

    def leases(self) -> int:
        """Leases held now, over every version: the requests still being served."""
        return sum(v.leases for entry in self._models.values() for v in entry.versions.values())

    async def drained(self, timeout_s: float) -> None:
        """Wait until no lease is held, at most ``timeout_s``."""
        give_up = time.monotonic() + timeout_s
        while self.leases() and time.monotonic() < give_up:
            await asyncio.sleep(_DRAIN_POLL_S)

    async def close(self) -> None:
        """Unload every version (in-flight leases are waited for) and forget every model."""
        await self.apply([])
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


def retired_versions(
    states: Mapping[int, VersionState], aspired: Collection[int], held: Collection[int]
) -> list[int]:
    """The availability-preserving rule: which loaded versions to unload, lowest first.

    A version that is neither aspired nor held by a label is unloaded, but only once one of the
    aspired versions the manager knows is AVAILABLE, or when it knows none of them (nothing
    aspired, or nothing loaded yet); until then the old versions keep serving.

    Args:
        states: version number -> state, for every version the manager knows of the model.
        aspired: the version numbers the plan wants served.
        held: version numbers a label still points to while its new version loads.
    """
    known = [number for number in aspired if number in states]
    if known and not any(states[number] is VersionState.AVAILABLE for number in known):
        return []
    return sorted(
        number
        for number, state in states.items()
        if state is VersionState.AVAILABLE and number not in aspired and number not in held
    )


def routed_labels(
    wanted: Mapping[str, int], current: Mapping[str, int], available: Collection[int]
) -> tuple[dict[str, int], dict[str, int]]:
    """Where labels point: as ``wanted``, except that a label whose new version is not AVAILABLE
    stays on its ``current`` version while that one is AVAILABLE, so no request finds it empty.

    Returns:
        Label -> version it routes to now, and label -> version it moves to once that one is
        AVAILABLE (the held labels).
    """
    labels, held = dict(wanted), {}
    for label, number in wanted.items():
        old = current.get(label)
        if old is None or old == number or number in available:
            continue
        if old in available:
            labels[label], held[label] = old, number
    return labels, held


def _close(servable: Closeable | None) -> None:
    if servable is None:
        return
    try:
        servable.close()
    except Exception:  # closing must not break unloading of the rest
        log.exception("closing a model raised")
