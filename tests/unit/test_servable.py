"""Servable: what one loaded version holds, built whole at load and freed whole at close."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from inferd.config import BatchingParameters, FeatureSettings, ModelSettings
from inferd.errors import ModelLoadError
from inferd.features import FeatureStores
from inferd.manager import ModelManager
from inferd.metrics import Metrics
from inferd.placement import INLINE_PREDICT_S
from inferd.repository import ModelPlan, VersionSource
from inferd.servable import Servable, ServableFactory
from inferd.service import InferenceService
from inferd.threads import ThreadPool
from inferd.types import InferenceRequest, ModelId, ModelRef, Signature, Tensors, TensorSpec

F32 = np.dtype(np.float32)


class FakeModel:
    """Sums its two input columns; remembers its calls and whether it was closed."""

    def __init__(self, fail_warm_up: bool = False) -> None:
        self.signatures = {
            "serving_default": Signature(
                "serving_default", (TensorSpec("x", F32, (-1, 2)),), (TensorSpec("y", F32, (-1,)),)
            )
        }
        self.calls = 0
        self.closed = False
        self._fail = fail_warm_up

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        self.calls += 1
        if self._fail:
            raise ValueError("zeros are not welcome")
        return {"y": inputs["x"].sum(axis=1)}

    def close(self) -> None:
        self.closed = True


class Loads:
    """A model loader that hands out fake models and keeps them for inspection."""

    def __init__(self, fail_warm_up: bool = False) -> None:
        self.models: list[FakeModel] = []
        self._fail = fail_warm_up

    def __call__(
        self, version_dir: Path, settings: ModelSettings, platform: str | None
    ) -> tuple[FakeModel, str]:
        model = FakeModel(self._fail)
        self.models.append(model)
        return model, "fake"


def features(store: Path, **changes: object) -> FeatureSettings:
    values: dict[str, object] = {
        "store": str(store),
        "entity": ("restaurant_id",),
        "fetch": ("orders",),
        "inputs": {"x": ("distance", "orders")},
    }
    return FeatureSettings(**(values | changes))  # type: ignore[arg-type]


def test_close_frees_the_batchers_caches_model_and_metric_label_sets(tmp_path: Path) -> None:
    table = tmp_path / "restaurants.csv"
    table.write_text("restaurant_id,orders\nr1,3\nr2,5\n")
    settings = ModelSettings(
        batching=BatchingParameters(max_batch_size=4, num_batch_threads=1),
        features=features(table),
        prediction_cache_size=10,
    )
    plan = ModelPlan("m", {1: VersionSource(1, tmp_path, "f1")}, settings=settings)
    loads, metrics, stores = Loads(), Metrics(), FeatureStores()

    async def serve_then_close() -> Servable:
        threads_before = set(threading.enumerate())
        with ThreadPoolExecutor(2) as pool:
            factory = ServableFactory(ThreadPool(2, "infer"), metrics=metrics, features=stores, load=loads)
            manager: ModelManager[Servable] = ModelManager(pool, factory.load, metrics)
            await manager.apply([plan])
            with manager.lease(ModelRef("m")) as version:
                servable = version.servable
            assert servable is not None
            assert factory.live() == [servable]
            service = InferenceService(manager)
            request = InferenceRequest(
                {"restaurant_id": np.array(["r1", "r2"], dtype=object), "distance": np.array([1.0, 2.0])}
            )
            for _ in range(2):  # the second is answered from the prediction cache
                answer = await service.infer(ModelRef("m"), request)
                np.testing.assert_allclose(answer.outputs["y"], [4.0, 7.0])
            assert servable.batchers
            assert servable.join is not None
            assert servable.predictions is not None
            page = metrics.exposition().decode()
            for family in ("inferd_batch_size_count", "inferd_queue_rows", "inferd_prediction_cache_total"):
                assert re.search(rf'^{family}\{{model="m",(result="\w+",)?version="1"', page, re.M), family
            batch_threads = [
                t for t in set(threading.enumerate()) - threads_before if t.name.startswith("inferd-batch")
            ]
            assert batch_threads  # the first batch, unmeasured, ran on one
            await manager.close()
            assert factory.live() == []
            for thread in batch_threads:  # the batcher's threads end with it
                thread.join(10)
                assert not thread.is_alive()
            await stores.close()
            return servable

    servable = asyncio.run(serve_then_close())
    (model,) = loads.models
    assert model.closed
    assert model.calls == 2  # the warm-up, then one batch; the second request hit the cache
    assert servable.batchers == {}
    assert servable.join is None
    assert servable.predictions is None
    assert 'version="1"' not in metrics.exposition().decode()


def test_a_feature_plan_that_does_not_fit_the_signature_fails_the_load(tmp_path: Path) -> None:
    loads = Loads()
    too_wide = features(tmp_path / "t.csv", inputs={"x": ("distance", "orders", "more")})
    factory = ServableFactory(ThreadPool(1, "infer"), features=FeatureStores(), load=loads)
    with pytest.raises(
        ModelLoadError, match=re.escape("inputs.x has 3 column(s); the model takes FP32 [-1, 2]")
    ):
        factory.load(ModelId("m", 1), tmp_path, ModelSettings(features=too_wide), None)
    fitting = factory.load(
        ModelId("m", 2), tmp_path, ModelSettings(features=features(tmp_path / "t.csv")), None
    )
    assert factory.live() == [fitting]
    assert [m.closed for m in loads.models] == [True, False]


def test_a_failed_warm_up_fails_the_load_and_closes_the_model(tmp_path: Path) -> None:
    loads = Loads(fail_warm_up=True)
    factory = ServableFactory(ThreadPool(1, "infer"), load=loads)
    with pytest.raises(ModelLoadError, match="the warm-up call failed: ValueError: zeros are not welcome"):
        factory.load(ModelId("m", 1), tmp_path, ModelSettings(), None)
    factory.load(ModelId("m", 2), tmp_path, ModelSettings(warmup=False), None)
    assert [m.closed for m in loads.models] == [True, False]
    assert factory.live()[0].id == ModelId("m", 2)


class TimedModel(FakeModel):
    """A FakeModel that takes ``seconds`` per call and records the thread of each call."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.threads: list[str] = []

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        self.threads.append(threading.current_thread().name)
        if self.seconds:
            time.sleep(self.seconds)
        return super().predict(signature_name, inputs)


def calls_on(seconds: float, rows: int, calls: int) -> list[str]:
    """The thread names ``calls`` unbatched calls of ``rows`` rows ran on."""
    model = TimedModel(seconds)
    pool = ThreadPool(1, "infer")
    try:
        servable = Servable(ModelId("m", 1), model, "fake", ModelSettings(), pool, max_in_flight=4)
        inputs = {"x": np.ones((rows, 2), np.float32)}

        async def run_all() -> None:
            for _ in range(calls):
                outputs, _, _, batch_rows = await servable.run("serving_default", inputs, None)
                assert batch_rows == rows  # unbatched: the model computed this request alone
                assert outputs["y"].tolist() == [2.0] * rows

        asyncio.run(run_all())
    finally:
        pool.shutdown()
    return model.threads


def test_a_fast_model_runs_on_the_event_loop_after_its_first_calls_and_a_slow_one_never() -> None:
    fast = calls_on(0.0, 1, 50)
    assert fast[0].startswith("infer")  # unmeasured: on an inference thread
    # measured fast: inline (a loaded machine may stretch a few calls past the bound)
    assert fast.count(threading.main_thread().name) > 25
    slow = calls_on(INLINE_PREDICT_S * 20, 1, 4)
    assert all(name.startswith("infer") for name in slow)


def test_a_large_request_of_a_fast_model_goes_to_a_thread() -> None:
    model = TimedModel(0.0)
    pool = ThreadPool(1, "infer")
    try:
        servable = Servable(ModelId("m", 1), model, "fake", ModelSettings(), pool, max_in_flight=4)

        async def run(rows: int) -> None:
            await servable.run("serving_default", {"x": np.ones((rows, 2), np.float32)}, None)

        async def scenario() -> None:
            for _ in range(1000):  # until a call runs inline
                await run(1)
                if model.threads[-1] == threading.main_thread().name:
                    break
            # rows far past what the measured cost per row allows inline
            await run(int(INLINE_PREDICT_S * 1e9))

        asyncio.run(scenario())
    finally:
        pool.shutdown()
    assert model.threads[-2] == threading.main_thread().name
    assert model.threads[-1].startswith("infer")


def test_the_batcher_judges_its_batches_by_the_costs_the_servable_holds(tmp_path: Path) -> None:
    settings = ModelSettings(batching=BatchingParameters(max_batch_size=4, num_batch_threads=1))
    plan = ModelPlan("m", {1: VersionSource(1, tmp_path, "f1")}, settings=settings)
    models: list[TimedModel] = []

    def load(version_dir: Path, settings: ModelSettings, platform: str | None) -> tuple[TimedModel, str]:
        models.append(TimedModel(0.0))
        return models[-1], "fake"

    async def scenario() -> Servable:
        with ThreadPoolExecutor(1, thread_name_prefix="infer") as pool:
            factory = ServableFactory(ThreadPool(1, "infer"), load=load)
            manager: ModelManager[Servable] = ModelManager(pool, factory.load, Metrics())
            await manager.apply([plan])
            with manager.lease(ModelRef("m")) as version:
                servable = version.servable
            assert servable is not None
            assert servable.batchers
            for _ in range(20):
                await servable.run("serving_default", {"x": np.ones((2, 2), np.float32)}, None)
            await manager.apply([])
            return servable

    servable = asyncio.run(scenario())
    (model,) = models
    assert model.threads[0].startswith("infer")  # unmeasured
    assert model.threads.count(threading.main_thread().name) > 10  # then measured fast
    assert servable.call_costs("serving_default").inline(2)  # by the costs the servable hands out
