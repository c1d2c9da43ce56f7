"""``inferd batch`` on a model with ``[features]``: the file carries entity keys and request-side
columns, the features come from the embedded store or a real redis-server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.e2e.test_batch import batch, read_output
from tests.models import features_toml, write_onnx_affine
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

ROWS = 3_000
RESTAURANTS = [f"r{i}" for i in range(40)]
ORDERS = {r: float(i % 7) for i, r in enumerate(RESTAURANTS)}
OUTSTANDING = {r: i / 8 for i, r in enumerate(RESTAURANTS)}


def write_model(base: Path, store: str, **extra: str) -> None:
    """``y = 2 x + 1`` on x = [distance_km, incoming_orders, outstanding_per_min], the last two
    looked up by restaurant_id."""
    write_onnx_affine(base / "1", scale=2.0, offset=1.0, width=3)
    (base / "inferd.toml").write_text(features_toml(store, **extra))


def requests_table(unknown_every: int = 0) -> pa.Table:
    """``ROWS`` rows of id, restaurant_id and distance_km; every ``unknown_every``-th row names
    a restaurant the store does not have."""
    keys = [RESTAURANTS[(7 * i) % len(RESTAURANTS)] for i in range(ROWS)]
    if unknown_every:
        keys = [f"gone{i}" if i % unknown_every == 5 else k for i, k in enumerate(keys)]
    distance = np.random.default_rng(1).random(ROWS).astype(np.float32) * 10
    return pa.table({"id": np.arange(ROWS) * 3, "restaurant_id": keys, "distance_km": distance})


def joined_predictions(
    model: Path, table: pa.Table, rows: list[int], defaults: float | None = None
) -> np.ndarray:
    """onnxruntime, in-process, on the fully joined inputs of ``rows``."""
    import onnxruntime as ort

    keys = table.column("restaurant_id").to_pylist()
    distance = table.column("distance_km").to_numpy()
    x = np.array(
        [[distance[i], ORDERS.get(keys[i], defaults), OUTSTANDING.get(keys[i], defaults)] for i in rows],
        dtype=np.float32,
    )
    session = ort.InferenceSession(str(model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": x})
    return np.asarray(y)


def write_store(path: Path) -> None:
    table = pa.table(
        {
            "restaurant_id": RESTAURANTS,
            "incoming_orders": [ORDERS[r] for r in RESTAURANTS],
            "outstanding_per_min": [OUTSTANDING[r] for r in RESTAURANTS],
        }
    )
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)


def fill(server: RedisServer) -> None:
    client = server.client()
    for r in RESTAURANTS:
        client.hset(
            f"restaurant:{r}", mapping={"incoming_orders": ORDERS[r], "outstanding_per_min": OUTSTANDING[r]}
        )


def output_rows(path: Path) -> tuple[list[int], np.ndarray]:
    table = read_output(path)
    return table.column("id").to_pylist(), np.array(table.column("y").to_pylist(), dtype=np.float32)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_features_from_the_embedded_store_and_missing_entities_rejected(tmp_path: Path, suffix: str) -> None:
    model = tmp_path / "eta"
    model.mkdir()
    write_store(model / f"restaurants{suffix}")
    write_model(model, f"restaurants{suffix}")
    table = requests_table(unknown_every=100)
    source = tmp_path / f"requests{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, source)
    else:
        pacsv.write_csv(table, source)
    out = tmp_path / "scores.parquet"

    done = batch(model, source, out, "--id-column=id", "--batch-size=64", "--memory-budget-mb=2", check=1)
    assert f"{ROWS - 30} rows scored, 30 rejected" in done.stderr

    unknown = [i for i in range(ROWS) if i % 100 == 5]
    good = [i for i in range(ROWS) if i % 100 != 5]
    ids, y = output_rows(out)
    assert ids == [3 * i for i in good]
    np.testing.assert_allclose(y, joined_predictions(model, table, good), rtol=1e-6)
    rejects = [
        json.loads(line) for line in out.with_name("scores.parquet.rejects.jsonl").read_text().splitlines()
    ]
    assert [r["row"] for r in rejects] == unknown
    assert rejects[0]["error"] == f"restaurant_id 'gone5' is not in feature store restaurants{suffix}"
    assert rejects[0]["file"] == str(source)


def test_defaults_score_rows_whose_entity_is_missing(tmp_path: Path) -> None:
    model = tmp_path / "eta"
    model.mkdir()
    write_store(model / "restaurants.parquet")
    write_model(
        model, "restaurants.parquet", defaults="{ incoming_orders = -1.0, outstanding_per_min = -1.0 }"
    )
    table = requests_table(unknown_every=100)
    pq.write_table(table, tmp_path / "requests.parquet")
    out = tmp_path / "scores.parquet"

    batch(model, tmp_path / "requests.parquet", out, "--id-column=id")
    ids, y = output_rows(out)
    assert ids == [3 * i for i in range(ROWS)]
    np.testing.assert_allclose(
        y, joined_predictions(model, table, list(range(ROWS)), defaults=-1.0), rtol=1e-6
    )


def test_the_file_needs_the_request_columns_not_the_looked_up_ones(tmp_path: Path) -> None:
    model = tmp_path / "eta"
    model.mkdir()
    write_store(model / "restaurants.parquet")
    write_model(model, "restaurants.parquet")
    pq.write_table(requests_table().drop(["distance_km"]), tmp_path / "requests.parquet")

    done = batch(model, tmp_path / "requests.parquet", tmp_path / "out.parquet", check=2)
    assert "input 'distance_km' (FP32 [-1]): missing column(s)" in done.stderr
    assert not (tmp_path / "out.parquet").exists()


def test_features_from_redis_one_round_trip_per_chunk_and_a_store_outage_fails_then_resumes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    model = tmp_path / "eta"
    write_model(model, redis_server.url, cache_ttl_s="0")
    table = requests_table(unknown_every=100)
    pq.write_table(table, tmp_path / "requests.parquet")
    out = tmp_path / "scores.parquet"
    args = (
        model,
        tmp_path / "requests.parquet",
        out,
        "--id-column=id",
        "--batch-size=64",
        "--memory-budget-mb=2",
    )

    fill(redis_server)
    redis_server.client().config_resetstat()
    summary = tmp_path / "summary.json"
    batch(*args, "--summary-json", summary, check=1)
    chunks = math.ceil(ROWS / json.loads(summary.read_text())["chunk_rows"])
    assert chunks > 1
    # Batches of 64 rows, but at most one lookup per chunk (the cache is off; the lookups of two
    # chunks scored at once may go as one).
    assert 1 <= redis_server.client().info("commandstats")["cmdstat_eval"]["calls"] <= chunks
    good = [i for i in range(ROWS) if i % 100 != 5]
    ids, y = output_rows(out)
    assert ids == [3 * i for i in good]
    np.testing.assert_allclose(y, joined_predictions(model, table, good), rtol=1e-6)

    out.unlink()
    redis_server.kill()
    done = batch(*args, check=2)
    assert f"inferd batch: feature store {redis_server.url} failed for model eta" in done.stderr, done.stderr
    assert not out.exists()

    redis_server.start()
    fill(redis_server)
    batch(*args, "--resume", check=1)
    ids, y = output_rows(out)
    assert ids == [3 * i for i in good]
    np.testing.assert_allclose(y, joined_predictions(model, table, good), rtol=1e-6)
