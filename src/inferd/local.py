"""One model version loaded in this process, without a server: what ``inferd batch``,
``inferd select`` and ``inferd optimize`` score and measure with. The version goes through the
same ``ModelManager`` and ``Servable`` as in the server (runtime, ``inferd.toml``, warm-up,
feature join)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from inferd.config import ModelSettings
from inferd.errors import ModelLoadError
from inferd.features import FeatureStores
from inferd.manager import ModelManager
from inferd.repository import ModelPlan
from inferd.runtimes import Model
from inferd.servable import Servable, ServableFactory
from inferd.service import InferenceService
from inferd.threads import ThreadPool
from inferd.types import ModelRef, VersionState, VersionStatus


@dataclass(frozen=True)
class Loaded:
    """One version loaded in this process: ``inferd batch`` calls ``model`` on ``pool`` directly;
    ``inferd select`` also times single requests through ``service``."""

    service: InferenceService
    ref: ModelRef
    status: VersionStatus
    model: Model
    settings: ModelSettings
    pool: Executor
    """The inference threads of direct ``model`` calls (``service`` has as many of its own)."""


@contextlib.asynccontextmanager
async def in_process(plan: ModelPlan, threads: int) -> AsyncIterator[Loaded]:
    """The plan's one version loaded (runtime, ``inferd.toml``, warm-up) with ``threads``
    inference threads; unloaded on exit.

    Raises:
        ModelLoadError: the version did not load or failed its warm-up.
    """
    with (
        ThreadPoolExecutor(1, "inferd-load") as load_pool,
        ThreadPoolExecutor(threads, "inferd-infer") as infer_pool,
    ):
        stores = FeatureStores()
        service_threads = ThreadPool(threads, "inferd-infer")
        manager: ModelManager[Servable] = ModelManager(
            load_pool, ServableFactory(service_threads, features=stores).load
        )
        try:
            await manager.apply([plan])
            ref = ModelRef(plan.name)
            (status,) = manager.status(ref)
            if status.state is not VersionState.AVAILABLE:
                raise ModelLoadError(status.error_message)
            # Nothing unloads the version before manager.close(), which waits for leases to end.
            with manager.lease(ref) as version:
                assert version.servable is not None
            service = InferenceService(manager)
            yield Loaded(service, ref, status, version.servable.model, version.settings, infer_pool)
        finally:
            with _quiet(logging.getLogger("inferd.manager")):  # "unloading ..." is no news here
                await manager.close()
            await stores.close()
            service_threads.shutdown()


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Only warnings and errors from ``logger`` while inside."""
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
