"""ModelControl: keeps the manager in step with the repository, and the admin operations.

The poll loop calls ``sync``; the admin APIs (the V2 model repository extension, TF Serving's
HandleReloadConfigRequest) call ``index``, ``load``, ``unload`` and ``reload_config``. All of them
take one lock, so a scan never runs beside another. Call from the event loop's thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from inferd.config import ModelConfig
from inferd.errors import InvalidArgument, ModelLoadError, NotFound
from inferd.manager import ModelManager
from inferd.repository import Repository
from inferd.types import ModelRef, VersionState


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index: a model, or one version of it, and its state."""

    name: str
    version: str
    state: VersionState | None  # None: configured but unloaded by an admin
    reason: str


class ModelControl:
    """Reconciles ``manager`` to ``repository``, minus the models an admin unloaded."""

    def __init__(self, repository: Repository, manager: ModelManager[Any]) -> None:
        self._repository = repository
        self._manager = manager
        self._unloaded: set[str] = set()
        self._configured: list[str] = []  # every model the last scan planned, by name
        self._moved: dict[str, dict[str, int]] = {}  # labels an admin moved: model -> label -> version
        self._lock = asyncio.Lock()

    async def sync(self, trusted: frozenset[str] = frozenset()) -> None:
        """Scan the repository (in a thread) and reconcile the manager to it.

        Raises:
            ConfigError: the model configuration cannot be read (at the first scan only).
        """
        async with self._lock:
            await self._sync(trusted)

    async def _sync(self, trusted: frozenset[str] = frozenset()) -> None:
        plans = await asyncio.to_thread(self._repository.scan, trusted)
        self._configured = sorted(plan.name for plan in plans)
        plans = [
            replace(plan, labels={**plan.labels, **self._moved[plan.name]})
            if plan.name in self._moved
            else plan
            for plan in plans
        ]
        await self._manager.apply(plan for plan in plans if plan.name not in self._unloaded)

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

    async def load(self, name: str) -> None:
        """Serve ``name`` again if it was unloaded, and load its new versions now, without
        waiting for the files to look stable.

        Raises:
            NotFound: ``name`` is not a configured model.
            ModelLoadError: no version of it is AVAILABLE afterwards; the message says why.
        """
        async with self._lock:
            self._require_configured(name)
            self._unloaded.discard(name)
            await self._sync(frozenset({name}))
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
        async with self._lock:
            self._require_configured(name)
            self._unloaded.add(name)
            await self._sync()

    def labels(self, name: str) -> dict[str, int]:
        """Where the labels of model ``name`` point now (label -> version)."""
        return self._manager.labels(name)

    async def move_label(self, name: str, label: str, version: int) -> None:
        """Point ``label`` of model ``name`` at ``version`` (a rollback, or a promotion) until the
        server restarts; the repository's own labels for other names still apply.

        Raises:
            NotFound: ``name`` is not a configured model.
            InvalidArgument: ``version`` is not AVAILABLE, so the label could not move.
        """
        async with self._lock:
            self._require_configured(name)
            available = {
                s.version for s in self._manager.status(ModelRef(name)) if s.state is VersionState.AVAILABLE
            }
            if version not in available:
                raise InvalidArgument(
                    f"version: {version} of model {name!r} is not AVAILABLE; "
                    f"expected one of {sorted(available)}"
                )
            self._moved.setdefault(name, {})[label] = version
            await self._sync()

    async def reload_config(self, models: list[ModelConfig]) -> None:
        """Serve exactly ``models`` from now on (see ``Repository.replace_models``); a model an
        admin unloaded is served again if it is named.

        Raises:
            ModelLoadError: the config is in force, but these models have no version AVAILABLE.
        """
        async with self._lock:
            self._repository.replace_models(models)
            self._unloaded.clear()
            await self._sync()
        failed = [m.name for m in models if not self._manager.serves(m.name)]
        if failed:
            raise ModelLoadError(
                f"the new config is in force, but no version of {failed} could be loaded; see GetModelStatus"
            )

    def _require_configured(self, name: str) -> None:
        if name not in self._configured:
            raise NotFound(f"model {name!r} is not in the model repository")
