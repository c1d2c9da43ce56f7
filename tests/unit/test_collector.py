"""The garbage collector settled at start: what it froze stays out of collections until a version
is unloaded, and an unloaded version's reference cycles are then collected."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inferd import collector
from inferd.config import ModelSettings
from inferd.manager import ModelManager
from inferd.repository import ModelPlan, VersionSource
from inferd.types import ModelId, ModelRef, VersionState


class Cyclic:
    """A servable in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self

    def supervise(self, name: str, on_exit: Callable[[str], None]) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Whatever a test froze is unfrozen after it, for the tests that run after it."""
    yield
    gc.unfreeze()


def plan(*versions: int) -> ModelPlan:
    return ModelPlan("m", {v: VersionSource(v, Path(f"/models/m/{v}"), f"f{v}") for v in versions}, {})


def test_a_settled_cycle_is_kept_until_released() -> None:
    kept = Cyclic()
    ref = weakref.ref(kept)
    collector.settle()
    del kept
    gc.collect()
    assert ref() is not None, "a frozen object was collected"
    collector.release()
    gc.collect()
    assert ref() is None, "released, the cycle was not collected"


def test_an_unloaded_version_is_collected_though_it_was_frozen() -> None:
    made: list[weakref.ref[Cyclic]] = []

    def load(id: ModelId, path: Path, settings: ModelSettings, platform: str | None) -> Cyclic:
        servable = Cyclic()
        made.append(weakref.ref(servable))
        return servable

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            manager: ModelManager[Cyclic] = ModelManager(pool, load)
            try:
                await manager.apply([plan(1)])
                collector.settle()  # version 1 frozen with everything else, as at a server's start
                await manager.apply([plan(2)])
                give_up = time.monotonic() + 10
                while VersionState.END not in {s.state for s in manager.status(ModelRef("m"))}:
                    assert time.monotonic() < give_up, "version 1 was not unloaded"
                    await asyncio.sleep(0.005)
            finally:
                await manager.close()

    asyncio.run(main())
    gc.collect()
    assert made[0]() is None, "the unloaded version's servable was kept"


def test_settling_again_waits_for_a_release_and_a_minute() -> None:
    collector.settle()
    now = time.monotonic()
    assert not collector.settle_again(now + collector.RESETTLE_S), "settled again with no release"
    collector.release()
    assert gc.get_freeze_count() == 0
    assert not collector.settle_again(now + collector.RESETTLE_S / 2), "settled again too soon"
    assert collector.settle_again(now + collector.RESETTLE_S + 1)
    assert gc.get_freeze_count() > 0
    assert not collector.settle_again(now + collector.RESETTLE_S * 3), "settled twice for one release"


def test_a_release_during_a_settles_collection_is_not_lost() -> None:
    """A version unloaded while a settle collects (here: from inside the collection) is released
    again by the next settle, not frozen for good."""
    released: list[bool] = []

    def unload_meanwhile(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2 and not released:
            released.append(True)
            collector.release()

    gc.callbacks.append(unload_meanwhile)
    try:
        collector.settle()
    finally:
        gc.callbacks.remove(unload_meanwhile)
    assert released
    assert collector.settle_again(time.monotonic() + collector.RESETTLE_S), "the release was lost"
