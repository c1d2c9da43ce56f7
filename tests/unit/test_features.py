"""Feature joins, the entity and prediction caches, and the embedded store, in-process."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inferd.config import FeatureSettings
from inferd.errors import ModelLoadError, NotFound, Unavailable
from inferd.features import FeatureJoin, PredictionCache, parse_row, plan_join
from inferd.features.cache import EntityCache
from inferd.features.embedded import EmbeddedStore
from inferd.metrics import FeatureStats
from inferd.types import Signature, TensorSpec

F32 = np.dtype(np.float32)
OBJ = np.dtype(object)


def model_signature(*inputs: TensorSpec) -> Signature:
    return Signature("serving_default", inputs, (TensorSpec("y", F32, (-1,)),))


def feature_settings(store: Path, **changes: object) -> FeatureSettings:
    values: dict[str, object] = {
        "store": str(store),
        "entity": ("restaurant_id",),
        "fetch": ("orders", "outstanding"),
        "inputs": {"x": ("distance", "orders", "outstanding")},
        "cache_ttl_s": 60.0,
    }
    return FeatureSettings(**(values | changes))  # type: ignore[arg-type]


def test_entity_cache_expires_evicts_the_oldest_and_caches_missing_entities() -> None:
    cache = EntityCache(size=2, ttl_s=10)
    cache.put({"a": (1.0,), "b": None}, now=0)
    assert cache.lookup(["a", "b", "c"], now=5) == ({"a": (1.0,), "b": None}, ["c"])
    assert cache.lookup(["a"], now=10) == ({}, ["a"])  # expired at 0 + 10
    assert len(cache) == 0  # and dropped: an expired entry holds no memory
    cache.put({"a": (2.0,), "b": (4.0,)}, now=10)
    cache.lookup(["a"], now=11)  # a hit does not refresh an entry: a was fetched first
    cache.put({"c": (3.0,)}, now=11)
    assert cache.lookup(["a", "b", "c"], now=12) == ({"b": (4.0,), "c": (3.0,)}, ["a"])


def test_entity_cache_is_bounded_by_bytes_and_skips_long_unknown_keys() -> None:
    cache = EntityCache(size=1_000_000, ttl_s=10, max_bytes=64 * 1024)
    for i in range(1000):
        cache.put({f"{i:0100d}": (1.0, 2.0)}, now=0)
    assert 0 < cache.bytes <= 64 * 1024
    assert cache.lookup([f"{999:0100d}"], now=1)[0]  # the newest are kept
    cache.put({"x" * 2000: None}, now=1)  # an unknown key that long is never cached
    assert cache.lookup(["x" * 2000], now=1) == ({}, ["x" * 2000])
    cache.put({"k": (1.0,)}, now=20)  # everything older expired: put drops it
    assert len(cache) == 1


def test_a_zero_ttl_caches_nothing() -> None:
    cache = EntityCache(size=10, ttl_s=0)
    cache.put({"a": (1.0,)}, now=0)
    assert cache.lookup(["a"], now=0) == ({}, ["a"])


def test_prediction_cache_keys_on_exact_bytes_and_evicts_the_least_recent() -> None:
    cache = PredictionCache(size=1)
    x = {"x": np.array([[1.0, 2.0]], dtype=np.float32)}
    key = cache.key("s", x)
    assert key == cache.key("s", {"x": x["x"].copy()})
    assert key != cache.key("t", x)
    assert key != cache.key("s", {"x": x["x"].astype(np.float64)})
    assert key != cache.key("s", {"x": x["x"].reshape(2, 1)})
    assert key != cache.key("s", {"x": np.nextafter(x["x"], 3, dtype=np.float32)})
    texts = {"t": np.array(["a", "b"], dtype=object)}
    assert cache.key("s", texts) != cache.key("s", {"t": np.array(["ab", ""], dtype=object)})
    cache.put(key, {"y": np.ones(1)})
    assert cache.get(key) is not None
    cache.put(cache.key("s", texts), {"y": np.zeros(1)})
    assert cache.get(key) is None


def test_prediction_cache_is_bounded_by_bytes() -> None:
    cache = PredictionCache(size=1000, max_bytes=1024 * 1024)
    assert cache.key("s", {"x": np.zeros(300_000, np.float32)}) is None  # 1.2 MB: never cached
    empty_strings = np.full(200_000, "", dtype=object)  # no text, but a key of 1.6 MB of references
    assert cache.key("s", {"t": empty_strings}) is None
    for i in range(100):
        x = np.full(10_000, i, np.float32)  # 40 kB of key, 40 kB of answer
        cache.put(cache.key("s", {"x": x}), {"y": x})
    assert 0 < cache.bytes <= 1024 * 1024
    assert len(cache) == 1024 * 1024 // 80_400
    newest = np.full(10_000, 99, np.float32)
    assert cache.get(cache.key("s", {"x": newest})) is not None


def test_the_request_signature_takes_keys_and_request_columns_instead_of_assembled_inputs() -> None:
    settings = feature_settings(Path("f.csv"), inputs={"x": ("distance", "orders", "outstanding")})
    other = model_signature(TensorSpec("z", F32, (-1, 2)))
    other = Signature("other", other.inputs, other.outputs)
    signatures = {
        "serving_default": model_signature(
            TensorSpec("x", F32, (-1, 3)), TensorSpec("hour", np.dtype(np.int64), (-1,))
        ),
        "other": other,
    }
    plans = plan_join(settings, signatures)
    assert list(plans) == ["serving_default"]  # "other" has no input x: callers send it as it is
    assert plans["serving_default"].request.inputs == (
        TensorSpec("restaurant_id", OBJ, (-1,)),
        TensorSpec("distance", F32, (-1,)),
        TensorSpec("hour", np.dtype(np.int64), (-1,)),
    )


@pytest.mark.parametrize(
    ("inputs", "settings_changes", "fragment"),
    [
        ((TensorSpec("z", F32, (-1, 3)),), {}, "no signature takes them all"),
        ((TensorSpec("x", F32, (-1, 4)),), {}, "inputs.x has 3 column(s); the model takes FP32 [-1, 4]"),
        ((TensorSpec("x", F32, (-1,)),), {}, "the model takes FP32 [-1]"),
        ((TensorSpec("x", F32, (-1, 3)),), {"dtypes": {"orders": "string"}}, "must be a number type"),
        ((TensorSpec("x", F32, (-1, 3)),), {"dtypes": {"orders": "complex"}}, "unknown dtype 'complex'"),
        ((TensorSpec("x", F32, (-1, 3)), TensorSpec("distance", F32, (-1,))), {}, "also a model input"),
        # Such defaults failed each request that needed them: 1e30 with a 500 (OverflowError).
        (
            (TensorSpec("x", F32, (-1, 3)),),
            {"dtypes": {"orders": "int32"}, "defaults": {"orders": 1e30}},
            "defaults.orders: 1e+30 is not an integer in the range of int32",
        ),
        (
            (TensorSpec("x", F32, (-1, 3)),),
            {"dtypes": {"orders": "uint8"}, "defaults": {"orders": 2.5}},
            "defaults.orders: 2.5 is not an integer in the range of uint8",
        ),
    ],
)
def test_plans_that_cannot_work_fail_the_load(
    inputs: tuple[TensorSpec, ...], settings_changes: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(fragment)):
        plan_join(
            feature_settings(Path("f.csv"), **settings_changes), {"serving_default": model_signature(*inputs)}
        )


def test_parse_row_reads_bytes_text_and_numbers_and_refuses_garbage() -> None:
    dtypes = [np.dtype(np.float32), np.dtype(np.int64)]
    assert parse_row([b"1.5", b"7"], dtypes) == (1.5, 7)
    assert parse_row(["2", None], dtypes) == (2.0, None)
    assert parse_row(None, dtypes) is None
    with pytest.raises(ValueError, match="could not convert"):
        parse_row([b"lots", b"1"], dtypes)
    with pytest.raises(ValueError, match="1 values for 2 features"):
        parse_row([b"1"], dtypes)
    with pytest.raises(ValueError, match="99999999999999999999 is out of range for int64"):
        parse_row([b"1", b"9" * 20], dtypes)


def write_table(path: Path, rows: dict[str, list[object]]) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.table(rows), path)
    else:
        lines = [",".join(rows)] + [
            ",".join("" if v is None else str(v) for v in r) for r in zip(*rows.values(), strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")


def join(settings: FeatureSettings, store: EmbeddedStore, stats: FeatureStats | None = None) -> FeatureJoin:
    signature = model_signature(TensorSpec("x", F32, (-1, 3)))
    plans = plan_join(settings, {"serving_default": signature})
    return FeatureJoin("eta", settings, plans, store, stats or FeatureStats())


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_join_assembles_columns_in_order_and_caches_entities(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"restaurants{suffix}"
    write_table(path, {"restaurant_id": ["r1", "r2"], "outstanding": [0.5, 1.25], "orders": [5, 7]})
    settings = feature_settings(path)
    stats = FeatureStats()
    joiner = join(settings, EmbeddedStore(path, settings.entity), stats)
    inputs = {
        "restaurant_id": np.array(["r2", b"r1", "r2"], dtype=object),
        "distance": np.array([1.0, 2.0, 3.0], dtype=np.float32),
    }

    async def run() -> dict[str, np.ndarray]:
        first = await joiner.join("serving_default", inputs, None)
        assert (stats.cache.hits, stats.cache.misses, stats.round_trips) == (0, 2, 1)
        second = await joiner.join("serving_default", inputs, None)
        assert (stats.cache.hits, stats.cache.misses, stats.round_trips) == (2, 2, 1)
        np.testing.assert_array_equal(first["x"], second["x"])
        return first

    joined = asyncio.run(run())
    assert list(joined) == ["x"]
    assert joined["x"].dtype == np.float32
    np.testing.assert_array_equal(joined["x"], [[1.0, 7.0, 1.25], [2.0, 5.0, 0.5], [3.0, 7.0, 1.25]])


def test_composite_entities_join_their_columns_with_a_colon(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_table(
        path, {"city": ["b", "b"], "restaurant_id": ["r1", "r2"], "orders": [1, 2], "outstanding": [3, 4]}
    )
    settings = feature_settings(path, entity=("city", "restaurant_id"))
    joiner = join(settings, EmbeddedStore(path, settings.entity))
    inputs = {
        "city": np.array(["b"], dtype=object),
        "restaurant_id": np.array(["r2"], dtype=object),
        "distance": np.array([9.0], dtype=np.float32),
    }
    joined = asyncio.run(joiner.join("serving_default", inputs, None))
    np.testing.assert_array_equal(joined["x"], [[9.0, 2.0, 4.0]])


def test_missing_features_use_defaults_or_are_not_found(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_table(path, {"restaurant_id": ["r1", "r2"], "orders": [1, None], "outstanding": [3, 4]})
    lenient = feature_settings(path, defaults={"orders": -1, "outstanding": -2})
    joined = asyncio.run(
        join(lenient, EmbeddedStore(path, lenient.entity)).join(
            "serving_default",
            {
                "restaurant_id": np.array(["r2", "r3"], dtype=object),
                "distance": np.zeros(2, dtype=np.float32),
            },
            None,
        )
    )
    assert joined["x"][0].tolist() == [0.0, -1.0, 4.0]
    assert joined["x"][1].tolist() == [0.0, -1.0, -2.0]
    strict = feature_settings(path)
    with pytest.raises(NotFound, match=r"restaurant_id 'r2' has no feature 'orders' in feature store t\.csv"):
        asyncio.run(
            join(strict, EmbeddedStore(path, strict.entity)).join(
                "serving_default",
                {"restaurant_id": np.array(["r2"], dtype=object), "distance": np.zeros(1, dtype=np.float32)},
                None,
            )
        )


def test_an_unreadable_table_is_unavailable_or_defaults(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"
    inputs = {"restaurant_id": np.array(["r1"], dtype=object), "distance": np.ones(1, dtype=np.float32)}
    settings = feature_settings(path)
    stats = FeatureStats()
    with pytest.raises(Unavailable, match=r"feature store absent\.csv failed for model eta"):
        asyncio.run(
            join(settings, EmbeddedStore(path, settings.entity), stats).join("serving_default", inputs, None)
        )
    assert stats.errors == {"loading": 1}
    fallback = feature_settings(path, on_store_error="defaults", defaults={"orders": 0, "outstanding": 0})
    joined = asyncio.run(
        join(fallback, EmbeddedStore(path, fallback.entity)).join("serving_default", inputs, None)
    )
    assert joined["x"].tolist() == [[1.0, 0.0, 0.0]]


def test_the_embedded_store_rereads_a_changed_file_and_keeps_the_old_table_when_the_new_one_is_bad(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.parquet"
    write_table(path, {"restaurant_id": ["r1"], "orders": [1.0]})
    store = EmbeddedStore(path, ("restaurant_id",), poll_interval_s=0)

    async def run() -> None:
        assert await store.get(["r1", "r2"], ["orders", "absent"]) == [[1.0, None], None]
        write_table(path, {"restaurant_id": ["r1", "r2"], "orders": [2.0, 3.0]})
        os.utime(path, ns=(1, 1))  # a new modification time, even on a coarse clock
        while await store.get(["r2"], ["orders"]) != [[3.0]]:
            await asyncio.sleep(0.01)
        path.write_bytes(b"PAR1 broken")
        for _ in range(5):  # each get sees the change and retries the read, which fails
            assert await store.get(["r1"], ["orders"]) == [[2.0]]
            await asyncio.sleep(0.01)
        await store.close()

    asyncio.run(run())


def test_redis_store_names_hide_credentials_and_replies_are_checked() -> None:
    from inferd.features import StoreError
    from inferd.features.redis_store import _rows, public_name, trace_attributes

    assert public_name("redis://:secret@cache:6380/2") == "redis://cache:6380/2"
    assert public_name("rediss://user:pw@cache") == "rediss://cache:6379/0"
    assert public_name("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock"
    assert trace_attributes("redis://:secret@cache:6380/2") == {
        "db.system.name": "redis",
        "db.system": "redis",
        "db.operation.name": "EVAL",
        "db.namespace": "2",
        "server.address": "cache",
        "server.port": 6380,
        "network.transport": "tcp",
    }
    assert trace_attributes("rediss://user:pw@cache")["db.namespace"] == "0"
    unix = trace_attributes("unix:///run/redis.sock?db=1")
    assert (unix["server.address"], unix["db.namespace"], unix["network.transport"]) == (
        "/run/redis.sock",
        "1",
        "unix",
    )
    assert _rows([[b"1", None], [None, None]], 2, 2) == [[b"1", None], None]
    for reply, fragment in (
        ("OK", "expected 2 replies, got str"),
        ([[b"1"], [b"1", b"2"]], "2 values per entity"),
    ):
        with pytest.raises(StoreError, match=fragment):
            _rows(reply, 2, 2)


def test_lookups_waiting_for_the_store_go_out_together(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    count = 10
    write_table(
        path,
        {
            "restaurant_id": [f"r{i}" for i in range(count)],
            "orders": list(range(count)),
            "outstanding": [0] * count,
        },
    )
    settings = feature_settings(path, cache_ttl_s=0.0)
    stats = FeatureStats()
    joiner = join(settings, EmbeddedStore(path, settings.entity), stats)

    async def one(i: int) -> np.ndarray:
        inputs = {
            "restaurant_id": np.array([f"r{i}"], dtype=object),
            "distance": np.ones(1, dtype=np.float32),
        }
        return (await joiner.join("serving_default", inputs, None))["x"]

    async def run() -> list[np.ndarray]:
        return await asyncio.gather(*(one(i) for i in range(count)))

    answers = asyncio.run(run())
    assert [a.tolist() for a in answers] == [[[1.0, float(i), 0.0]] for i in range(count)]
    # The first lookup goes out alone (its caller sends it); the nine that came while it was
    # in flight go out as one.
    assert stats.round_trips == 2
    assert sum(stats.lookup.counts) == 2


class SlowStore:
    """A store that answers after ``delay_s``, counting the lookups it finished and those cut short."""

    name = "slow"

    def __init__(self, delay_s: float) -> None:
        self.trace_attributes: dict[str, str] = {}
        self.delay_s = delay_s
        self.answered = 0
        self.cancelled = 0

    async def get(self, entities: list[str], names: list[str]) -> list[list[object] | None]:
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1  # the Redis store starts its back-off here, for every request
            raise
        self.answered += 1
        return [[1.0, 2.0] for _ in entities]

    async def close(self) -> None:
        pass


def test_a_request_deadline_shorter_than_the_lookup_does_not_cut_the_lookup_short() -> None:
    # The first caller used to run the lookup itself, so its own deadline cancelled the store's
    # call: a client sending short gRPC deadlines put Redis in its back-off, and everyone else got
    # 503 "unreachable". Its request fails; the lookup goes on, bounded by lookup_timeout_ms.
    store = SlowStore(delay_s=0.05)
    settings = feature_settings(Path("unused.csv"), lookup_timeout_ms=2000.0)
    joiner = FeatureJoin(
        "eta",
        settings,
        plan_join(settings, {"serving_default": model_signature(TensorSpec("x", F32, (-1, 3)))}),
        store,  # type: ignore[arg-type]
        FeatureStats(),
    )
    inputs = {"restaurant_id": np.array(["r1"], dtype=object), "distance": np.ones(1, dtype=np.float32)}

    async def run() -> None:
        with pytest.raises(Unavailable, match="no answer"):
            await joiner.join("serving_default", inputs, time.monotonic() + 0.005)
        await asyncio.sleep(0.2)
        assert (store.answered, store.cancelled) == (1, 0)
        # A request with time to wait is answered.
        assert (await joiner.join("serving_default", inputs, None))["x"].tolist() == [[1.0, 1.0, 2.0]]
        assert (store.answered, store.cancelled) == (2, 0)

    asyncio.run(run())


def test_a_missing_entitys_key_is_quoted_in_the_error_only_up_to_200_characters(tmp_path: Path) -> None:
    """A client's 2 MB entity key came back whole in the 404."""
    path = tmp_path / "t.csv"
    write_table(path, {"restaurant_id": ["r1"], "orders": [1], "outstanding": [3]})
    settings = feature_settings(path)
    huge = "k" * 2_000_000
    with pytest.raises(NotFound) as missing:
        asyncio.run(
            join(settings, EmbeddedStore(path, settings.entity)).join(
                "serving_default",
                {"restaurant_id": np.array([huge], dtype=object), "distance": np.zeros(1, dtype=np.float32)},
                None,
            )
        )
    assert missing.value.message == f"restaurant_id '{'k' * 199} is not in feature store t.csv"
