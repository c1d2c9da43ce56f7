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

With a ``Residency`` (``--memory_budget``, or a model's ``[residency] idle_unload_s``), a
version can also be *cold*: listed, routed to, but not loaded (``ServedVersion.cold`` says why;
its status is END with that reason). Under a budget, aspired versions start cold unless pinned.
A request to a cold version (``acquire``) starts its load, shared by every request that arrives
meanwhile, and waits for it at most ``load_wait_s``, then gets UNAVAILABLE while the load goes
on. Before a load is charged to its device, idle versions are unloaded to make room, chosen by
``residency.GreedyDualSizeFrequency``; a chosen version becomes cold at once for new requests,
and its memory is counted until its last lease is returned and it is closed. A version with
``idle_unload_s`` is unloaded after that long without a lease (``unload_idle``).

``drain`` starts a shutdown: readiness goes false, every version reports UNLOADING, new leases
are refused with UNAVAILABLE, and ``drained`` waits for the leases already held.

The manager is not thread-safe: call it from the event loop's thread. Loading and closing run in
the executor given to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from inferd import collector
from inferd.config import ModelSettings
from inferd.devices import DeviceMemory, FrameworkMemory
from inferd.errors import InferdError, InvalidArgument, ModelLoadError, NotFound, Unavailable, UnknownLabel
from inferd.metrics import Metrics
from inferd.repository import ModelPlan, VersionSource
from inferd.residency import (
    HOST,
    MAPPED_ONNX,
    RESIDENT_OVERHEAD,
    Footprints,
    GreedyDualSizeFrequency,
    MemoryBudget,
    ResidencyStats,
    disk_bytes,
    format_bytes,
    mapped_weights,
    runtime_guess,
)
from inferd.runtimes import Supervised
from inferd.runtimes.onnx import maps_weights
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
    platform: str | None = None
    cold: str = ""
    """Non-empty: listed and routed to, not loaded; why (its status message)."""
    last_used: float = 0.0
    cold_since: float | None = None
    """When the request that started this version's load arrived, until its first answer."""
    waiters: int = 0
    """Requests awaiting this version's load; each gets a lease taken when it ends (``adopted``)
    so that no other load can unload the version before they use it."""
    adopted: int = 0

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
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loading: dict[int, tuple[asyncio.Future[None], ServedVersion[S]]] = field(default_factory=dict)
    """Version number -> its load started by a request (shared by the requests that wait)."""
    aspired: set[int] = field(default_factory=set)

    def refresh_latest(self) -> None:
        available = [v for v in self.versions.values() if _routable(v)]
        self.latest = max(available, key=lambda v: v.id.version, default=None)


class Lease(Generic[S]):
    """Holds a version in service while a request uses it; use as a context manager."""

    __slots__ = ("_held", "_manager", "_version")

    def __init__(self, manager: ModelManager[S], version: ServedVersion[S], held: bool = False) -> None:
        self._manager = manager
        self._version = version
        self._held = held  # counted in ``leases`` already (taken for a request that awaited the load)

    def __enter__(self) -> ServedVersion[S]:
        if self._held:
            self._held = False
        else:
            self._version.leases += 1
        return self._version

    def __exit__(self, *exc: object) -> None:
        version = self._version
        version.leases -= 1
        if version.leases == 0:
            self._manager._wake()
        if (
            version.leases == 0
            and version.state is not VersionState.AVAILABLE
            and version.servable is not None
        ):
            self._manager._close_later(version)


@dataclass(slots=True)
class Residency:
    """What the manager needs to bound memory: budgets by device, the eviction policy, learned
    footprints, the device layer, how long a request waits for a cold load, and the counts.

    ``lazy`` is true when a budget is set: aspired versions then start cold unless pinned.
    """

    budget: MemoryBudget[Any] = field(default_factory=lambda: MemoryBudget({}))
    load_wait_s: float = 5.0
    devices: DeviceMemory = field(default_factory=FrameworkMemory)
    policy: GreedyDualSizeFrequency[Any] = field(default_factory=GreedyDualSizeFrequency)
    footprints: Footprints = field(default_factory=Footprints)
    stats: ResidencyStats = field(default_factory=ResidencyStats)
    busy_after_s: float = 1.0
    """How long a load waits for idle versions to unload before it unloads busy ones too."""

    @property
    def lazy(self) -> bool:
        return bool(self.budget.budgets)


class ModelManager(Generic[S]):
    """Owns every served model version and closes it; see the module docstring for the lifecycle.

    Args:
        executor: where loads and closes run.
        loader: makes a servable of a version folder; called in ``executor``.
        metrics: where load durations and failures are counted; by default a collector of its own.
        residency: budgets and eviction (see the module docstring); the default bounds nothing.
    """

    def __init__(
        self,
        executor: Executor,
        loader: Loader[S],
        metrics: Metrics | None = None,
        residency: Residency | None = None,
    ) -> None:
        self._executor = executor
        self._loader = loader
        self._metrics = metrics or Metrics()
        self._models: dict[str, _Entry[S]] = {}
        self._moved: dict[str, dict[str, int]] = {}
        """Labels set by ``move_label``, by model: they win over the plan's, also after ``remove``."""
        self._closing: set[asyncio.Future[Any]] = set()
        self._draining = False
        self.residency = residency or Residency()
        self._loading_on: dict[str, set[ServedVersion[S]]] = {}
        self._overlapped: set[ServedVersion[S]] = set()
        self._room: asyncio.Event | None = None
        self._sizes: dict[ServedVersion[S], tuple[int, str]] = {}
        self._runtimes_seen: set[tuple[str, str]] = set()

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
        if self._draining:
            log.info("shutting down: unloading model %s", name)
        else:
            log.info("model %s is no longer configured; unloading it", name)
        async with entry.lock:
            for version in list(entry.versions.values()):
                self._retire(entry, version)

    async def reconcile(self, plan: ModelPlan) -> None:
        """Load the plan's new versions, then retire versions it no longer aspires to."""
        entry: _Entry[S] = self._models.setdefault(plan.name, _Entry())
        async with entry.lock:
            entry.aspired = set(plan.aspired)
            for number in sorted(plan.aspired, reverse=True):
                current, source = entry.versions.get(number), plan.aspired[number]
                if current is not None and current.cold and current.source.fingerprint == source.fingerprint:
                    continue
                if self._needs_load(current, source):
                    if self.residency.lazy and not plan.settings.residency.pin and not plan.error:
                        self._list_cold(entry, plan, source)
                    else:
                        await self._load(entry, plan, source)
            self._move_labels(plan.name, entry, {**plan.labels, **self._moved.get(plan.name, {})})
            for number in set(entry.held.values()):
                if (held := entry.versions.get(number)) is not None and held.cold:
                    self._start_cold(entry, held)  # the label moves at a scan after it loaded
            if plan.error is None:
                entry.settings, entry.weights = plan.settings, plan.settings.traffic
            self._resplit(plan.name, entry)
            self._retire_unaspired(entry)

    def _retire_unaspired(self, entry: _Entry[S]) -> None:
        """Retire the versions ``entry`` no longer aspires to, by ``retired_versions``. A cold
        aspired version is not yet AVAILABLE there: it may fail to load, and the old one must
        then still serve."""
        states = {
            number: (VersionState.LOADING if number in entry.aspired else VersionState.AVAILABLE)
            if version.cold
            else version.state
            for number, version in entry.versions.items()
        }
        held = {entry.labels[label] for label in entry.held}
        for number in retired_versions(states, entry.aspired, held):
            self._retire(entry, entry.versions[number])

    def _move_labels(self, name: str, entry: _Entry[S], wanted: Mapping[str, int]) -> None:
        """Route labels by ``routed_labels``, warning when a label starts being held. A cold
        version counts as available once it has loaded in this process: a label does not move
        to one that may fail to load."""
        known = self.residency.footprints.known
        available = {
            n
            for n, v in entry.versions.items()
            if v.state is VersionState.AVAILABLE or (v.cold and known(v.id))
        }
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
        """Point ``label`` at ``version`` now and at every later reconcile, whatever the plan says,
        until the server restarts: the one way a label moves at run time (an admin's rollback or
        promotion, a finished rollout). ``version`` must be routable: AVAILABLE, or cold under a
        memory budget (the next request by the label loads it).

        Raises:
            NotFound: unknown model.
            InvalidArgument: ``version`` is not routable, so the label did not move.
        """
        entry = self._routable(name, version)
        self._moved.setdefault(name, {})[label] = version
        entry.labels = {**entry.labels, label: version}
        entry.held.pop(label, None)
        self._resplit(name, entry)

    def check_routable(self, name: str, version: int) -> None:
        """Raise as ``move_label`` would when ``version`` of ``name`` cannot take a label now."""
        self._routable(name, version)

    def _routable(self, name: str, version: int) -> _Entry[S]:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"Could not find any versions of model {name}")
        served = entry.versions.get(version)
        if served is None or not _routable(served):
            routable = sorted(n for n, v in entry.versions.items() if _routable(v))
            raise InvalidArgument(
                f"version: {version} of model {name!r} is not AVAILABLE; expected one of {routable}"
            )
        return entry

    def pin_labels(self, moved: Mapping[str, Mapping[str, int]]) -> None:
        """Make ``moved`` (model -> label -> version) the labels that win over the plans' from the
        next reconcile on, in place of those moved here before: the admin state's, which the
        workers of one server share, so that the last move made through any of them wins in all."""
        self._moved = {name: dict(labels) for name, labels in moved.items()}

    def retry_failed(self, name: str) -> None:
        """Forget the versions of model ``name`` that failed to load, so that the next reconcile
        loads them again although their files did not change (an admin's load: what made them
        fail may be gone). Nothing happens for an unknown model."""
        entry = self._models.get(name)
        if entry is None:
            return
        for number, version in list(entry.versions.items()):
            if version.state is VersionState.END and version.error_code != "OK" and not version.died:
                del entry.versions[number]

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

    @staticmethod
    def _list_cold(entry: _Entry[S], plan: ModelPlan, source: VersionSource) -> None:
        """List an aspired version without loading it: its first request will."""
        version: ServedVersion[S] = ServedVersion(
            ModelId(plan.name, source.version), source, plan.settings, VersionState.END
        )
        version.platform = plan.platform
        version.cold = "not loaded: loads on its first request (memory budget)"
        version.error_message = version.cold
        entry.versions[source.version] = version
        entry.refresh_latest()

    async def _load(self, entry: _Entry[S], plan: ModelPlan, source: VersionSource) -> None:
        version: ServedVersion[S] = ServedVersion(
            ModelId(plan.name, source.version), source, plan.settings, VersionState.LOADING
        )
        version.platform = plan.platform
        entry.versions[source.version] = version
        await self._load_into(entry, version, plan.error or "", "start")

    async def _load_into(self, entry: _Entry[S], version: ServedVersion[S], error: str, cause: str) -> None:
        """Load ``version`` (state LOADING, in ``entry``): make room, load, measure, route."""
        source = version.source
        log.info("loading %s from %s (%s)", version.id, source.path, cause)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        device = _device(version.settings)
        try:
            if error:
                raise ModelLoadError(error)
            await self._make_room(version, device)
            self._begin_measure(version, device)
            try:
                servable, added = await loop.run_in_executor(
                    self._executor, self._measured_load, version, device
                )
            finally:
                overlapped = self._end_measure(version, device)
        except InferdError as exc:
            self._forget_charge(version)
            self._fail(version, exc.code.grpc_code, exc.message)
        except Exception as exc:  # a runtime's unexpected failure must not stop the server
            self._forget_charge(version)
            log.exception("loading %s failed unexpectedly", version.id)
            self._fail(version, "UNKNOWN", _error_text(exc))
        else:
            self._settle(version, device, added, overlapped, time.monotonic() - started)
            self.residency.stats.loads[cause] += 1
            version.servable, version.state = servable, VersionState.AVAILABLE
            version.cold, version.last_used = "", time.monotonic()
            version.leases += version.waiters
            version.adopted, version.waiters = version.adopted + version.waiters, 0
            if isinstance(servable, Supervised):

                def died(reason: str) -> None:  # called from the worker's reader thread
                    loop.call_soon_threadsafe(self._died, entry, version, reason)

                servable.supervise(str(version.id), died)
            log.info("%s is AVAILABLE: %s", version.id, servable)
        entry.refresh_latest()  # a failed load routes nothing: requests must not load it again
        ok = version.state is VersionState.AVAILABLE
        self._metrics.model_loaded(version.id.name, time.monotonic() - started, ok)
        self._wake()

    @staticmethod
    def _fail(version: ServedVersion[S], code: str, message: str) -> None:
        version.state, version.error_code, version.error_message = VersionState.END, code, message
        version.cold = ""
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
        if version.cold:
            version.cold, version.error_message = "", "no longer aspired"
            entry.refresh_latest()
            return
        if version.state is not VersionState.AVAILABLE:
            return
        self.residency.budget.mark_freeing(version)
        self.residency.policy.forget(version)
        version.state = VersionState.UNLOADING
        entry.refresh_latest()
        log.info("unloading %s once its %d in-flight request(s) finish", version.id, version.leases)
        if version.leases == 0:
            self._close_later(version)

    def _close_later(self, version: ServedVersion[S]) -> None:
        servable, version.servable = version.servable, None
        self.residency.budget.mark_freeing(version)
        self.residency.policy.forget(version)
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, _close, servable, self.residency.devices
        )
        self._closing.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._closing.discard(f)
            version.state = VersionState.END
            self._forget_charge(version)
            self._wake()
            log.info("%s unloaded", version.id)

        future.add_done_callback(done)

    def lease(self, ref: ModelRef, key: str | None = None) -> Lease[S]:
        """A lease on the version ``ref`` asks for; use it as a context manager. A ref that names
        neither version nor label goes by the model's traffic split when it has one (by ``key``,
        the request's traffic key, when given), else to the latest version. A cold version's load
        is started, and UNAVAILABLE raised meanwhile (``acquire`` waits for it).

        Raises:
            NotFound: unknown model, version or label, or the version is not AVAILABLE.
            Unavailable: the server is shutting down, or the version is not loaded yet.
        """
        return self._lease(*self._route(ref, key))

    def _lease(self, entry: _Entry[S], version: ServedVersion[S]) -> Lease[S]:
        if version.cold or version.state is not VersionState.AVAILABLE:
            self._start_cold(entry, version)
            raise Unavailable(f"model {version.id} is loading (it was not in memory); retry shortly")
        return Lease(self, version)

    async def acquire(self, ref: ModelRef, use: bool = True, key: str | None = None) -> Lease[S]:
        """Like ``lease``, but a cold version's load (started now, or by an earlier request) is
        waited for, at most ``residency.load_wait_s``; with ``use``, counted as a use of the
        version (for the eviction policy and idle unloading).

        Raises:
            NotFound: as ``lease``; also when the load failed (the message says why), unless
                ``ref`` names neither version nor label and an older version can serve it.
            Unavailable: shutting down, or the load takes longer than the wait (it goes on).
        """
        wait_s = self.residency.load_wait_s
        give_up = time.monotonic() + wait_s
        while True:
            entry, version = self._route(ref, key)
            if not version.cold:
                lease = self._lease(entry, version)
                if use:
                    version.last_used = time.monotonic()
                    self.residency.policy.hit(version)
                return lease
            load, loading = self._start_cold(entry, version)
            loading.waiters += 1
            try:
                await asyncio.wait_for(asyncio.shield(load), max(give_up - time.monotonic(), 0.0))
            except BaseException as exc:  # timed out, or the request was cancelled
                if loading.waiters:
                    loading.waiters -= 1
                elif loading.adopted:  # it loaded just before: return the lease taken for us
                    loading.adopted -= 1
                    Lease(self, loading, held=True).__exit__()
                if isinstance(exc, TimeoutError):
                    raise Unavailable(
                        f"model {version.id} is still loading after {wait_s:g} s (--load_wait_ms); "
                        "retry shortly"
                    ) from None
                raise
            if loading.adopted:
                loading.adopted -= 1
                if use:
                    loading.last_used = time.monotonic()
                    self.residency.policy.hit(loading)
                return Lease(self, loading, held=True)
            if loading.state is VersionState.END and loading.error_code != "OK":
                if ref.version is None and ref.label is None and entry.latest is not None:
                    continue  # the latest version failed to load: the one before it serves
                raise NotFound(f"model {loading.id} failed to load: {loading.error_message}")

    def _route(self, ref: ModelRef, key: str | None = None) -> tuple[_Entry[S], ServedVersion[S]]:
        """The entry and version ``ref`` resolves to: AVAILABLE or cold.

        Raises:
            NotFound, Unavailable: as ``lease``.
        """
        if self._draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        entry = self._models.get(ref.name)
        if entry is None:
            raise NotFound(f"Servable not found for request: Latest({ref.name})")
        if ref.version is not None:
            version = entry.versions.get(ref.version)
            if version is None or not _routable(version):
                raise NotFound(f"Servable not found for request: Specific({ref.name}, {ref.version})")
        elif ref.label is not None:
            number = entry.labels.get(ref.label)
            if number is None:
                raise UnknownLabel(f"Unrecognized servable version label: {ref.label}")
            version = entry.versions.get(number)
            if version is None or not _routable(version):
                raise NotFound(
                    f"label {ref.label!r} of model {ref.name!r} points to version {number}, "
                    "which is not available"
                )
        else:
            version = entry.latest
            if entry.split is not None:
                # Cold versions (under a budget) count: the request loads one, as a named one does.
                available = [n for n, v in entry.versions.items() if _routable(v)]
                chosen = entry.split.choose(key, available)
                if chosen is not None:
                    version = entry.versions[chosen]
            if version is None:
                raise NotFound(f"Servable not found for request: Latest({ref.name})")
        return entry, version

    def _start_cold(
        self, entry: _Entry[S], cold: ServedVersion[S]
    ) -> tuple[asyncio.Future[None], ServedVersion[S]]:
        """The load of cold version ``cold`` (the one running, or a new one) and the version it
        loads."""
        number = cold.id.version
        running = entry.loading.get(number)
        if running is not None and not running[0].done():
            return running
        cause = "reload" if self.residency.footprints.known(cold.id) else "cold"
        version: ServedVersion[S] = ServedVersion(cold.id, cold.source, cold.settings, VersionState.LOADING)
        version.platform = cold.platform
        version.cold = "loading for a request"
        version.cold_since = time.monotonic()
        entry.versions[number] = version
        entry.refresh_latest()
        task = asyncio.ensure_future(self._load_cold(entry, version, cause))
        entry.loading[number] = task, version
        return task, version

    async def _load_cold(self, entry: _Entry[S], version: ServedVersion[S], cause: str) -> None:
        await self._load_into(entry, version, "", cause)
        number = version.id.version
        gone = self._models.get(version.id.name) is not entry or entry.versions.get(number) is not version
        if version.state is VersionState.AVAILABLE and gone:
            self._retire(entry, version)  # unconfigured or replaced while it loaded
        elif version.state is VersionState.AVAILABLE:
            self._retire_unaspired(entry)  # it, if no longer aspired; else the versions it replaces

    def cold_answered(self, version: ServedVersion[S]) -> None:
        """A request on ``version`` was answered: the first one ends its cold start."""
        if version.cold_since is not None:
            self.residency.stats.cold_start.observe(time.monotonic() - version.cold_since)
            version.cold_since = None

    # -- memory: room, measurement, eviction ---------------------------------------------------

    def _on_disk(self, version: ServedVersion[S]) -> tuple[int, str]:
        path = version.source.path
        runtime = runtime_guess(path, version.platform or version.settings.runtime)
        on_disk = disk_bytes(path)
        shared = version.settings.runtime_tables.get("onnx", {}).get("share_weights") is True
        if (
            runtime == "onnx"
            and shared
            and (mapped_weights(path, on_disk) or maps_weights(path, version.settings))
        ):
            runtime = MAPPED_ONNX
        return on_disk, runtime

    async def _make_room(self, version: ServedVersion[S], device: str) -> None:
        """Charge ``version``'s reservation to ``device``, first unloading idle versions chosen
        by the policy until it fits, and waiting for their memory to be freed.

        Raises:
            ModelLoadError: the reservation is larger than the device's whole budget (less its
                pinned versions).
        """
        residency, budget = self.residency, self.residency.budget
        on_disk, runtime = await asyncio.to_thread(self._on_disk, version)
        self._sizes[version] = (on_disk, runtime)
        need = residency.footprints.reservation(version.id, on_disk, runtime)
        limit = budget.limit(device)
        if limit is not None:
            from_files = Footprints().reservation(version.id, on_disk, runtime)
            reservation = need
            busy_after = time.monotonic() + residency.busy_after_s
            while True:
                # pinned versions that loaded meanwhile can never make room: checked each round
                pinned = sum(budget.charged(v) for v in self._resident(device) if v.settings.residency.pin)
                if from_files > limit - pinned:  # a noisy measurement alone never makes a model too large
                    raise ModelLoadError(
                        f"model {version.id} needs about {format_bytes(from_files)} of {device} memory to "
                        f"load ({format_bytes(on_disk)} on disk), more than the whole --memory_budget of "
                        f"{format_bytes(limit)}" + (f" less {format_bytes(pinned)} pinned" if pinned else "")
                    )
                need = min(reservation, limit - pinned)
                free = limit - budget.used(device)
                if free >= need:
                    break
                short = need - free - budget.freeing(device)
                if short > 0:
                    for victim in self._victims(device, short, time.monotonic() >= busy_after):
                        self._evict(victim, "budget")
                if limit - budget.used(device) >= need:
                    break
                await self._wait_for_room(max(busy_after - time.monotonic(), 0.01))
        budget.charge(version, device, need)

    def _resident(self, device: str) -> list[ServedVersion[S]]:
        return [
            v
            for entry in self._models.values()
            for v in entry.versions.values()
            if v.state is VersionState.AVAILABLE and v.servable is not None and _device(v.settings) == device
        ]

    def _victims(self, device: str, short: int, busy_too: bool) -> list[ServedVersion[S]]:
        """Versions to unload for ``short`` more bytes: idle ones by the policy's order, then,
        with ``busy_too``, ones with requests in flight (they finish first); never pinned ones."""
        candidates = [v for v in self._resident(device) if not v.settings.residency.pin]
        sizes = {v: self.residency.budget.charged(v) for v in candidates}
        idle = [v for v in candidates if v.leases == 0]
        chosen = self.residency.policy.victims(idle, sizes, short)
        freed = sum(sizes[v] for v in chosen)
        if freed < short and busy_too:
            busy = [v for v in candidates if v.leases > 0]
            chosen += self.residency.policy.victims(busy, sizes, short - freed)
        return chosen

    def _evict(self, version: ServedVersion[S], reason: str) -> None:
        """Unload ``version`` (its memory is freed after its last lease) and list it cold."""
        entry = self._models.get(version.id.name)
        self.residency.stats.evictions[reason] += 1
        log.info("unloading %s (%s; %d request(s) in flight)", version.id, reason, version.leases)
        if entry is not None and entry.versions.get(version.id.version) is version:
            cold: ServedVersion[S] = ServedVersion(
                version.id, version.source, version.settings, VersionState.END
            )
            cold.platform = version.platform
            cold.cold = f"evicted ({reason}): loads again on its next request"
            cold.error_message = cold.cold
            entry.versions[version.id.version] = cold
        version.state = VersionState.UNLOADING
        if entry is not None:
            entry.refresh_latest()
        self.residency.budget.mark_freeing(version)
        self.residency.policy.forget(version)
        if version.leases == 0:
            self._close_later(version)

    def unload_idle(self) -> None:
        """Unload every loaded version whose ``idle_unload_s`` passed without a request."""
        now = time.monotonic()
        for entry in list(self._models.values()):
            for version in list(entry.versions.values()):
                idle_s = version.settings.residency.idle_unload_s
                if (
                    idle_s > 0
                    and not version.settings.residency.pin
                    and version.state is VersionState.AVAILABLE
                    and version.leases == 0
                    and now - version.last_used > idle_s
                ):
                    self._evict(version, "idle")

    def resident_bytes(self) -> list[tuple[str, str, int]]:
        """(model, version, bytes charged) of every loaded version, for ``/metrics``."""
        return [
            (v.id.name, str(v.id.version), self.residency.budget.charged(v))
            for entry in self._models.values()
            for v in entry.versions.values()
            if v.state is VersionState.AVAILABLE
        ]

    async def _wait_for_room(self, timeout_s: float) -> None:
        """Until memory is freed, a lease returned or a load ended, at most ``timeout_s``."""
        if self._room is None or self._room.is_set():
            self._room = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), timeout_s)

    def _wake(self) -> None:
        """Memory was freed or a load ended: loads waiting for room look again."""
        if self._room is not None:
            self._room.set()

    def _begin_measure(self, version: ServedVersion[S], device: str) -> None:
        loading = self._loading_on.setdefault(device, set())
        loading.add(version)
        if len(loading) > 1:
            self._overlapped.update(loading)

    def _end_measure(self, version: ServedVersion[S], device: str) -> bool:
        """True when another load on the device overlapped this one (its reading is shared)."""
        self._loading_on.get(device, set()).discard(version)
        overlapped = version in self._overlapped
        self._overlapped.discard(version)
        return overlapped

    def _measured_load(self, version: ServedVersion[S], device: str) -> tuple[S, int]:
        """In a load thread: the servable and the bytes its device gained while it loaded."""
        devices = self.residency.devices
        devices.trim()  # what earlier unloads freed is not counted as this load's
        before = devices.used(device)
        servable = self._loader(version.id, version.source.path, version.settings, version.platform)
        devices.trim()  # nor what the load itself freed again (a parsed file, say)
        return servable, devices.used(device) - before

    def _settle(
        self, version: ServedVersion[S], device: str, added: int, overlapped: bool, load_s: float
    ) -> None:
        """Charge the loaded version its footprint: the bytes measured (when no other load ran
        beside it, and it is not its runtime's first load in this process, which also pays the
        framework's one-time setup), never less than its size on disk; learned for its next load."""
        residency = self.residency
        on_disk, runtime = self._sizes.pop(version, (0, ""))
        first = (device, runtime) not in self._runtimes_seen
        self._runtimes_seen.add((device, runtime))
        if overlapped or first:
            footprint = residency.footprints.footprint(version.id, on_disk, runtime)
        else:
            footprint = max(added, on_disk + RESIDENT_OVERHEAD.get(runtime, 0))
            residency.footprints.learn(version.id, footprint)
        if not residency.footprints.known(version.id):
            residency.footprints.learn(version.id, footprint)
        residency.budget.charge(version, device, footprint)
        residency.policy.admit(version, footprint, load_s)

    def _forget_charge(self, version: ServedVersion[S]) -> None:
        self._sizes.pop(version, None)
        self.residency.budget.release(version)
        self.residency.policy.forget(version)

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

    @property
    def draining(self) -> bool:
        """Whether a shutdown began (``drain``)."""
        return self._draining

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
        loads = [task for entry in self._models.values() for task, _ in entry.loading.values()]
        await self.apply([])
        await asyncio.gather(*loads, return_exceptions=True)
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


def _close(servable: Closeable | None, devices: DeviceMemory) -> None:
    if servable is None:
        return
    try:
        servable.close()
    except Exception:  # closing must not break unloading of the rest
        log.exception("closing a model raised")
    del servable
    collector.release()  # the version may be frozen: its reference cycles must be collectable
    devices.trim()


def _error_text(exc: Exception) -> str:
    """``Type: message``; the type alone when the exception's ``str()`` raises (as a model's own
    exception class may), so that the failed load is reported all the same."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__} (its message could not be read)"


def _routable(version: ServedVersion[Any]) -> bool:
    """A request may be routed to it: loaded, or cold (loaded by the request)."""
    return version.state is VersionState.AVAILABLE or bool(version.cold)


def _device(settings: ModelSettings) -> str:
    """The budget a version is charged to: its GPU, or host memory."""
    return settings.device if settings.device.startswith("cuda") else HOST
