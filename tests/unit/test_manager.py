"""ModelManager's lifecycle with a fake loader: availability, labels, leases, deaths, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError, NotFound, Unavailable
from inferd.manager import ModelManager, retired_versions, routed_labels
from inferd.repository import ModelPlan, VersionSource
from inferd.types import ModelId, ModelRef, VersionState

T = TypeVar("T")
AVAILABLE, END, UNLOADING, LOADING = (
    VersionState.AVAILABLE,
    VersionState.END,
    VersionState.UNLOADING,
    VersionState.LOADING,
)


class FakeServable:
    """What the fake loader makes: records its close; can report its worker's death."""

    def __init__(self, id: ModelId, events: list[str]) -> None:
        self.id = id
        self.events = events
        self.closed = False
        self.on_exit: Callable[[str], None] | None = None

    def supervise(self, name: str, on_exit: Callable[[str], None]) -> None:
        self.on_exit = on_exit

    def close(self) -> None:
        self.closed = True
        self.events.append(f"close {self.id.version}")


class FakeLoader:
    """Loads every version at once, except those told to fail or to wait for a gate."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.made: dict[int, FakeServable] = {}
        self.failing: set[int] = set()
        self.raising: dict[int, Exception] = {}  # versions whose load raises this, as a runtime may
        self.gates: dict[int, threading.Event] = {}

    def __call__(
        self, id: ModelId, path: Path, settings: ModelSettings, platform: str | None
    ) -> FakeServable:
        if gate := self.gates.get(id.version):
            assert gate.wait(10), "the test never opened the gate"
        if id.version in self.failing:
            self.events.append(f"fail {id.version}")
            raise ModelLoadError(f"version {id.version} has no weights")
        if (error := self.raising.get(id.version)) is not None:
            raise error
        self.events.append(f"load {id.version}")
        servable = self.made[id.version] = FakeServable(id, self.events)
        return servable


def plan(versions: Mapping[int, str] | list[int], labels: Mapping[str, int] | None = None) -> ModelPlan:
    """A plan for model ``m`` aspiring to ``versions`` (number -> fingerprint, or numbers)."""
    prints = versions if isinstance(versions, Mapping) else {v: f"f{v}" for v in versions}
    aspired = {v: VersionSource(v, Path(f"/models/m/{v}"), f) for v, f in prints.items()}
    return ModelPlan("m", aspired, dict(labels or {}))


def states(manager: ModelManager[FakeServable]) -> dict[int, VersionState]:
    return {s.version: s.state for s in manager.status(ModelRef("m"))}


def leased(manager: ModelManager[FakeServable], ref: ModelRef) -> int:
    with manager.lease(ref) as version:
        return version.id.version


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` on the event loop, for at most 10 s."""
    give_up = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def run(test: Callable[[ModelManager[FakeServable], FakeLoader], Awaitable[T]]) -> T:
    """Run ``test`` with a manager on a fresh event loop, closing the manager after it."""
    loader = FakeLoader()

    async def main() -> T:
        with ThreadPoolExecutor(2) as pool:
            manager: ModelManager[FakeServable] = ModelManager(pool, loader)
            try:
                return await test(manager, loader)
            finally:
                for gate in loader.gates.values():
                    gate.set()
                await manager.close()

    return asyncio.run(main())


def started(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coroutine)


def test_a_new_version_loads_and_serves_before_the_old_one_retires() -> None:
    async def test(manager: ModelManager[FakeServable], loader: FakeLoader) -> None:
        await manager.apply([plan([1])])
        loader.gates[2] = threading.Event()
        reconcile = started(manager.reconcile(plan([2])))
        await until(lambda: states(manager).get(2) is LOADING, "version 2 loading")
        assert states(manager)[1] is AVAILABLE
        assert leased(manager, ModelRef("m")) == 1  # still served while version 2 loads
        loader.gates[2].set()
        await reconcile
        assert leased(manager, ModelRef("m")) == 2
        await until(lambda: states(manager) == {2: AVAILABLE, 1: END}, "version 1 unloaded")
        assert loader.events == ["load 1", "load 2", "close 1"]

    run(test)


def test_a_failed_load_never_replaces_a_working_version() -> None:
    async def test(manager: ModelManager[FakeServable], loader: FakeLoader) -> None:
        await manager.apply([plan([1])])
        loader.failing.add(2)
        await manager.apply([plan([2])])
        (failed, working) = manager.status(ModelRef("m"))
        assert (failed.version, failed.state, failed.error_code) == (2, END, "INVALID_ARGUMENT")
        assert "version 2 has no weights" in failed.error_message
        assert (working.version, working.state) == (1, AVAILABLE)
        assert leased(manager, ModelRef("m")) == 1
        assert manager.ready()
        # The same files are not tried again; new files are.
        await manager.apply([plan([2])])
        assert loader.events == ["load 1", "fail 2"]
        loader.failing.clear()
        await manager.apply([plan({2: "f2-fixed"})])
        await until(lambda: states(manager) == {2: AVAILABLE, 1: END}, "version 2 replacing 1")
        assert not loader.made[2].closed

    run(test)


class Unprintable(Exception):
    """A model's own exception whose message cannot be read."""

    def __str__(self) -> str:
        raise Unprintable()


def test_a_load_failing_with_an_unprintable_exception_ends_and_is_retried_once_fixed() -> None:
    async def test(manager: ModelManager[FakeServable], loader: FakeLoader) -> None:
        await manager.apply([plan([1])])
        loader.raising[2] = Unprintable()
        await manager.apply([plan([2])])
        (failed, working) = manager.status(ModelRef("m"))
        assert (failed.version, failed.state, failed.error_code) == (2, END, "UNKNOWN")
        assert failed.error_message.startswith("Unprintable")
        assert (working.version, working.state) == (1, AVAILABLE)
        loader.raising.clear()
        await manager.apply([plan({2: "f2-fixed"})])
        await until(lambda: states(manager) == {2: AVAILABLE, 1: END}, "version 2 replacing 1")

    run(test)


def test_a_label_holds_on_its_version_until_the_new_one_is_available() -> None:
    async def test(manager: ModelManager[FakeServable], loader: FakeLoader) -> None:
        await manager.apply([plan([1], {"stable": 1})])
        loader.failing.add(2)
        await manager.apply([plan([2], {"stable": 2})])
        # Version 2 failed: "stable" stays on 1, which stays loaded for it though not aspired.
        assert leased(manager, ModelRef("m", label="stable")) == 1
        assert states(manager) == {2: END, 1: AVAILABLE}
        loader.failing.clear()
        await manager.apply([plan({2: "f2-fixed"}, {"stable": 2})])
        assert leased(manager, ModelRef("m", label="stable")) == 2
        await until(lambda: loader.made[1].closed, "version 1 closed once no label holds it")

    run(test)


def test_a_moved_label_wins_over_the_plan_also_after_the_model_is_removed_and_served_again() -> None:
    async def test(manager: ModelManager[FakeServable], loader: FakeLoader) -> None:
        await manager.apply([plan([1, 2], {"stable": 1})])
        manager.move_label("m", "stable", 2)
        assert leased(manager, ModelRef("m", label="stable")) == 2
        await manager.apply([plan([1, 2], {"stable": 1})])  # the next scan does not move it back
        assert leased(manager, ModelRef("m", label="stable")) == 2
        await manager.remove("m")  # an admin's unload, then load
        await manager.reconcile(plan([1, 2], {"stable": 1}))
        assert leased(manager, ModelRef("m", label="stable")) == 2
        with pytest.raises(
            InvalidArgument, match=r"version: 3 of model 'm' is not AVAILABLE; expected one of \[1, 2\]"
        ):
            manager.move_label("m", "stable", 3)
        with pytest.raises(NotFound):
            manager.move_label("other", "stable", 1)

    run(test)


def test_the_label_and_retire_rules_are_pure_functions() -> None:
    # A label moves only to an AVAILABLE version, and holds on an AVAILABLE old one meanwhile.
    assert routed_labels({"a": 2}, {"a": 1}, available={1}) == ({"a": 1}, {"a": 2})
    assert routed_labels({"a": 2}, {"a": 1}, available={1, 2}) == ({"a": 2}, {})
    assert routed_labels({"a": 2}, {"a": 1}, available=set()) == ({"a": 2}, {})
    assert routed_labels({"a": 2}, {}, available=set()) == ({"a": 2}, {})
    # Old versions go only once an aspired one is AVAILABLE, or when none of them is known.
    assert retired_versions({1: AVAILABLE, 2: LOADING}, aspired=[2], held=[]) == []
    assert retired_versions({1: AVAILABLE, 2: END}, aspired=[2], held=[]) == []
    assert retired_versions({1: AVAILABLE, 2: AVAILABLE}, aspired=[2], held=[]) == [1]
    assert retired_versions({1: AVAILABLE, 2: AVAILABLE}, aspired=[2], held=[1]) == []
    assert retired_versions({1: AVAILABLE, 3: AVAILABLE}, aspired=[], held=[]) == [1, 3]


def test_unloading_waits_for_the_last_lease() -> None:
    async def test(manager: ModelManager[FakeServable], loader: FakeLoader) -> None:
        await manager.apply([plan([1])])
        with manager.lease(ModelRef("m")) as first, manager.lease(ModelRef("m")):
            await manager.apply([plan([2])])
            assert states(manager) == {2: AVAILABLE, 1: UNLOADING}
            assert first.servable is not None
            assert not loader.made[1].closed
            with pytest.raises(NotFound):
                manager.lease(ModelRef("m", version=1))
        await until(lambda: states(manager)[1] is END, "version 1 closed")
        assert loader.made[1].closed
        assert manager.leases() == 0

    run(test)


def test_a_worker_death_is_reported_and_the_version_loaded_again() -> None:
    async def test(manager: ModelManager[FakeServable], loader: FakeLoader) -> None:
        await manager.apply([plan([1])])
        on_exit = loader.made[1].on_exit
        assert on_exit is not None
        dead = threading.Thread(target=on_exit, args=("the worker process exited with code -9",))
        dead.start()
        dead.join()
        await until(lambda: states(manager)[1] is END, "the death reported")
        (status,) = manager.status(ModelRef("m"))
        assert (status.error_code, status.error_message) == (
            "INTERNAL",
            "the worker process exited with code -9",
        )
        with pytest.raises(NotFound):
            manager.lease(ModelRef("m"))
        assert not manager.ready()
        await until(lambda: loader.made[1].closed, "the dead version closed")
        await manager.apply([plan([1])])
        assert states(manager) == {1: AVAILABLE}
        assert not loader.made[1].closed  # a new servable

    run(test)


def test_drain_refuses_new_leases_and_waits_for_those_held() -> None:
    async def test(manager: ModelManager[FakeServable], loader: FakeLoader) -> None:
        await manager.apply([plan([1])])
        held = manager.lease(ModelRef("m"))
        held.__enter__()
        manager.drain()
        assert not manager.ready()
        assert states(manager) == {1: UNLOADING}
        with pytest.raises(Unavailable, match="shutting down"):
            manager.lease(ModelRef("m"))
        waiting = started(manager.drained(timeout_s=10))
        await asyncio.sleep(0)
        assert not waiting.done()
        held.__exit__(None, None, None)
        await waiting
        assert manager.leases() == 0

    run(test)
