"""Online features joined into requests, against a real redis-server and the embedded store."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from inferd._proto.types_pb2 import DT_FLOAT, DT_STRING
from tests.conftest import ServerProcess, launch
from tests.e2e.test_grpc import to_numpy
from tests.e2e.test_metrics import samples, value
from tests.models import features_toml, write_onnx_affine, write_python_model
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

ECHO = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": inputs["x"]}
"""
ECHO_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]}'
)
FEATURES = {
    "r1": {"incoming_orders": "5", "outstanding_per_min": "0.5"},
    "r2": {"incoming_orders": "7", "outstanding_per_min": "1.25"},
    "r3": {"incoming_orders": "2", "outstanding_per_min": "0"},
}


def write_echo(repo: Path, name: str, toml: str) -> None:
    write_python_model(repo / name / "1", ECHO, ECHO_SIGNATURE)
    (repo / name / "inferd.toml").write_text(toml)


def fill(store: RedisServer, features: dict[str, dict[str, str]] = FEATURES) -> None:
    client = store.client()
    for entity, values in features.items():
        client.hset(f"restaurant:{entity}", mapping=values)


def predict(server: ServerProcess, model: str, instances: list[dict[str, object]]) -> requests.Response:
    return requests.post(f"{server.url}/v1/models/{model}:predict", json={"instances": instances}, timeout=10)


def expected(
    rows: list[tuple[str, float]], features: dict[str, dict[str, str]] = FEATURES
) -> list[list[float]]:
    return [
        [d, float(features[r]["incoming_orders"]), float(features[r]["outstanding_per_min"])] for r, d in rows
    ]


@pytest.fixture
def serve(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[[dict[str, str]], ServerProcess]]:
    """Start inferd on a repository of echo models, each with the given inferd.toml."""
    started: list[ServerProcess] = []

    def start(models: dict[str, str]) -> ServerProcess:
        repo = tmp_path / f"repo{len(started)}"
        for name, toml in models.items():
            write_echo(repo, name, toml)
        server = launch(tmp_path, str(repo), "--rest_api_timeout_in_ms=5000")
        started.append(server)
        server.wait_for(lambda: all(server.status(m) == {"1": "AVAILABLE"} for m in models), "the models")
        return server

    yield start
    for server in started:
        server.stop()


def test_joined_inputs_in_every_request_format(
    redis_server: RedisServer, serve: Callable[..., ServerProcess]
) -> None:
    fill(redis_server)
    server = serve({"eta": features_toml(redis_server.url)})
    rows = [("r1", 3.5), ("r2", 1.0), ("r1", 0.25)]
    want = np.array(expected(rows), dtype=np.float32)

    response = predict(server, "eta", [{"restaurant_id": r, "distance_km": d} for r, d in rows])
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["predictions"], want)

    columns = {"restaurant_id": [r for r, _ in rows], "distance_km": [d for _, d in rows]}
    response = requests.post(f"{server.url}/v1/models/eta:predict", json={"inputs": columns}, timeout=10)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["outputs"], want)

    keys = np.array([r.encode() for r, _ in rows], dtype=object)
    distances = np.array([d for _, d in rows], dtype=np.float32)
    for module, client in (
        (httpclient, httpclient.InferenceServerClient(server.url.removeprefix("http://"))),
        (grpcclient, grpcclient.InferenceServerClient(server.grpc_target)),
    ):
        key_input = module.InferInput("restaurant_id", [3], "BYTES")
        key_input.set_data_from_numpy(keys)
        distance_input = module.InferInput("distance_km", [3], "FP32")
        distance_input.set_data_from_numpy(distances)
        result = client.infer("eta", [key_input, distance_input])
        np.testing.assert_allclose(result.as_numpy("y"), want)

    request = ps.PredictRequest(model_spec=ps.ModelSpec(name="eta"))
    request.inputs["restaurant_id"].dtype = DT_STRING
    request.inputs["restaurant_id"].tensor_shape.dim.add(size=3)
    request.inputs["restaurant_id"].string_val.extend(keys.tolist())
    request.inputs["distance_km"].dtype = DT_FLOAT
    request.inputs["distance_km"].tensor_shape.dim.add(size=3)
    request.inputs["distance_km"].float_val.extend(distances.tolist())
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = ps_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    np.testing.assert_allclose(to_numpy(reply.outputs["y"], np.float32), want)


def test_metadata_shows_what_the_caller_sends(
    redis_server: RedisServer, serve: Callable[..., ServerProcess]
) -> None:
    server = serve({"eta": features_toml(redis_server.url)})
    v1 = requests.get(f"{server.url}/v1/models/eta/metadata", timeout=5).json()
    inputs = v1["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert {name: spec["dtype"] for name, spec in inputs.items()} == {
        "restaurant_id": "DT_STRING",
        "distance_km": "DT_FLOAT",
    }
    v2 = requests.get(f"{server.url}/v2/models/eta", timeout=5).json()
    assert v2["inputs"] == [
        {"name": "restaurant_id", "datatype": "BYTES", "shape": [-1]},
        {"name": "distance_km", "datatype": "FP32", "shape": [-1]},
    ]
    grpc_meta = grpcclient.InferenceServerClient(server.grpc_target).get_model_metadata("eta")
    assert [t.name for t in grpc_meta.inputs] == ["restaurant_id", "distance_km"]


def test_a_batch_is_one_round_trip_and_cached_entities_none(
    redis_server: RedisServer, serve: Callable[..., ServerProcess]
) -> None:
    fill(redis_server)
    server = serve(
        {
            "fresh": features_toml(redis_server.url, cache_ttl_s="0"),
            "cached": features_toml(redis_server.url, cache_ttl_s="600"),
        }
    )
    batch = [{"restaurant_id": r, "distance_km": 1.0} for r in ("r1", "r2", "r3", "r1", "r2") * 4]
    before = redis_server.calls("eval")
    assert predict(server, "fresh", batch).status_code == 200
    assert redis_server.calls("eval") == before + 1
    assert predict(server, "fresh", batch).status_code == 200
    assert redis_server.calls("eval") == before + 2

    assert predict(server, "cached", batch).status_code == 200
    assert redis_server.calls("eval") == before + 3
    for _ in range(3):
        assert predict(server, "cached", batch[:3]).status_code == 200
    assert redis_server.calls("eval") == before + 3


def test_a_changed_entity_shows_once_its_cache_entry_expires(
    redis_server: RedisServer, serve: Callable[..., ServerProcess]
) -> None:
    fill(redis_server)
    server = serve({"eta": features_toml(redis_server.url, cache_ttl_s="5")})
    one = [{"restaurant_id": "r1", "distance_km": 2.0}]
    assert predict(server, "eta", one).json()["predictions"] == [[2.0, 5.0, 0.5]]
    redis_server.client().hset("restaurant:r1", "incoming_orders", "9")
    assert predict(server, "eta", one).json()["predictions"] == [[2.0, 5.0, 0.5]]  # from the cache
    server.wait_for(
        lambda: predict(server, "eta", one).json()["predictions"] == [[2.0, 9.0, 0.5]], "the new value"
    )


def test_missing_entities_are_not_found_or_get_their_defaults(
    redis_server: RedisServer, serve: Callable[..., ServerProcess]
) -> None:
    fill(redis_server)
    redis_server.client().hset("restaurant:r9", "incoming_orders", "4")  # outstanding_per_min absent
    defaults = "{ incoming_orders = 0, outstanding_per_min = -1.0 }"
    server = serve(
        {
            "eta": features_toml(redis_server.url),
            "lenient": features_toml(redis_server.url, defaults=defaults),
            "partial": features_toml(redis_server.url, defaults="{ outstanding_per_min = -1.0 }"),
        }
    )
    response = predict(
        server,
        "eta",
        [{"restaurant_id": "r1", "distance_km": 1}, {"restaurant_id": "nope", "distance_km": 1}],
    )
    assert response.status_code == 404
    assert "restaurant_id 'nope' is not in feature store" in response.json()["error"]
    response = predict(server, "eta", [{"restaurant_id": "r9", "distance_km": 1}])
    assert response.status_code == 404
    assert "'r9' has no feature 'outstanding_per_min'" in response.json()["error"]

    rows = [{"restaurant_id": r, "distance_km": 1.0} for r in ("nope", "r9", "r2")]
    response = predict(server, "lenient", rows)
    assert response.json()["predictions"] == [[1.0, 0.0, -1.0], [1.0, 4.0, -1.0], [1.0, 7.0, 1.25]]
    assert predict(server, "partial", rows[1:]).json()["predictions"] == [[1.0, 4.0, -1.0], [1.0, 7.0, 1.25]]
    assert predict(server, "partial", rows[:1]).status_code == 404


def _hammer(
    server: ServerProcess, models: list[str], stop: threading.Event, seen: dict[str, list[object]]
) -> None:
    """Send one-row requests until ``stop``; record each model's (status, body, sent, answered), the
    times monotonic seconds, and any exception."""
    while not stop.is_set():
        for model in models:
            try:
                sent = time.monotonic()
                response = predict(server, model, [{"restaurant_id": "r2", "distance_km": 1.0}])
                seen[model].append((response.status_code, response.json(), sent, time.monotonic()))
            except Exception as exc:  # a hung or dropped request; the test fails on any
                seen[model].append(exc)


def test_request_columns_of_another_row_count_than_the_entities_are_a_400(
    redis_server: RedisServer, serve: Callable[..., ServerProcess]
) -> None:
    # The join stacked the columns into one matrix: ragged columns raised ValueError there, a 500.
    fill(redis_server)
    server = serve({"eta": features_toml(redis_server.url)})
    columns = {"restaurant_id": ["r1", "r2"], "distance_km": [1.0]}
    response = requests.post(f"{server.url}/v1/models/eta:predict", json={"inputs": columns}, timeout=10)
    assert response.status_code == 400, response.text
    assert "input 'distance_km': expected 2 rows, as input 'restaurant_id' has, got 1" in response.text
    inputs = [
        {"name": "restaurant_id", "datatype": "BYTES", "shape": [1], "data": ["r1"]},
        {"name": "distance_km", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.0]},
    ]
    response = requests.post(f"{server.url}/v2/models/eta/infer", json={"inputs": inputs}, timeout=10)
    assert response.status_code == 400, response.text
    assert "input 'distance_km': expected 1 rows, as input 'restaurant_id' has, got 3" in response.text
    assert predict(server, "eta", [{"restaurant_id": "r1", "distance_km": 1.0}]).status_code == 200


def test_redis_killed_mid_traffic_answers_503_or_defaults_then_recovers(
    redis_server: RedisServer, serve: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    fill(redis_server)
    defaults = "{ incoming_orders = 0, outstanding_per_min = 0 }"
    server = serve(
        {
            "eta": features_toml(redis_server.url, cache_ttl_s="0", lookup_timeout_ms="200"),
            "fallback": features_toml(
                redis_server.url, cache_ttl_s="0", defaults=defaults, on_store_error='"defaults"'
            ),
        }
    )
    models = ["eta", "fallback"]
    seen: dict[str, list[object]] = {m: [] for m in models}
    stop = threading.Event()
    workers = [threading.Thread(target=_hammer, args=(server, models, stop, seen)) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        server.wait_for(lambda: len(seen["eta"]) > 20, "traffic")
        redis_server.kill()
        server.wait_for(lambda: any(s[0] == 503 for s in seen["eta"][-4:] if isinstance(s, tuple)), "503s")
        during = len(seen["eta"])
        server.wait_for(lambda: len(seen["eta"]) > during + 20, "traffic while redis is down")
        restarted = time.monotonic()
        redis_server.start()
        fill(redis_server)
        filled = time.monotonic()
        mark = len(seen["eta"])
        server.wait_for(
            lambda: any(s[:2] == (200, {"predictions": [[1.0, 7.0, 1.25]]}) for s in seen["eta"][mark:]),
            "recovery",
        )
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert not any(w.is_alive() for w in workers), "a request hung"
    assert [s for m in models for s in seen[m] if not isinstance(s, tuple)] == []  # no exceptions
    # Between the restart and the refill the store is up but empty: 'r2' is then rightly NOT_FOUND.
    # A request counts as outside that window if it was answered before it or sent after it.
    answered = [s for s in seen["eta"] if isinstance(s, tuple)]
    outside = [s for s in answered if s[3] < restarted or s[2] > filled]
    refilling = [s for s in answered if restarted <= s[3] and s[2] <= filled]
    statuses = {s[0] for s in outside}
    assert statuses == {200, 503}, [s for s in outside if s[0] not in (200, 503)][:5]
    assert {s[0] for s in refilling} <= {200, 404, 503}, refilling[:5]
    errors = {s[1]["error"] for s in seen["eta"] if isinstance(s, tuple) and s[0] == 503}
    assert all(
        f"feature store redis://127.0.0.1:{redis_server.port}/0 failed for model eta" in e for e in errors
    )
    answers = {str(s[1]) for s in seen["fallback"] if isinstance(s, tuple)}
    assert {s[0] for s in seen["fallback"] if isinstance(s, tuple)} == {200}
    assert answers >= {"{'predictions': [[1.0, 7.0, 1.25]]}", "{'predictions': [[1.0, 0.0, 0.0]]}"}


def test_a_frozen_redis_times_out_with_503_and_other_models_keep_serving(
    redis_server: RedisServer, serve: Callable[..., ServerProcess]
) -> None:
    fill(redis_server)
    server = serve(
        {"eta": features_toml(redis_server.url, cache_ttl_s="0", lookup_timeout_ms="100"), "plain": ""}
    )
    one = [{"restaurant_id": "r1", "distance_km": 1.0}]
    assert predict(server, "eta", one).status_code == 200
    redis_server.freeze()
    try:
        answers = [predict(server, "eta", one) for _ in range(3)]
        assert [a.status_code for a in answers] == [503, 503, 503]
        assert all(a.headers["retry-after"] == "1" for a in answers)
        assert "failed for model eta (no answer); timeout 100 ms" in answers[0].json()["error"]
        plain = predict(server, "plain", [[1.0, 2.0, 3.0]])
        assert plain.json() == {"predictions": [[1.0, 2.0, 3.0]]}
    finally:
        redis_server.thaw()
    server.wait_for(lambda: predict(server, "eta", one).status_code == 200, "recovery")


def test_garbage_in_the_store_is_a_503_naming_the_store(
    redis_server: RedisServer, serve: Callable[..., ServerProcess]
) -> None:
    fill(redis_server)
    client = redis_server.client()
    client.hset("restaurant:bad", mapping={"incoming_orders": "lots", "outstanding_per_min": "1"})
    client.set("restaurant:flat", "not a hash")
    # A number too large for the feature's dtype: int64 could not hold it, and the answer was 500.
    client.hset("restaurant:huge", mapping={"incoming_orders": "9" * 20, "outstanding_per_min": "1"})
    # A megabyte of garbage: its whole text came back in every 503, a megabyte per request.
    client.hset("restaurant:vast", mapping={"incoming_orders": "x" * 2**20, "outstanding_per_min": "1"})
    integers = features_toml(redis_server.url, cache_ttl_s="0", dtypes='{incoming_orders = "int64"}')
    server = serve({"eta": features_toml(redis_server.url, cache_ttl_s="0"), "counts": integers})
    for model, entity, what in (
        ("eta", "bad", "unreadable features"),
        ("eta", "flat", "WRONGTYPE"),
        ("counts", "huge", "unreadable features: 99999999999999999999 is out of range for int64"),
        ("eta", "vast", "unreadable features: could not convert string to float: b'xxx"),
    ):
        response = predict(server, model, [{"restaurant_id": entity, "distance_km": 1.0}])
        assert response.status_code == 503, response.text[:1000]
        assert len(response.content) < 1000
        assert f"feature store redis://127.0.0.1:{redis_server.port}/0" in response.json()["error"]
        assert what in response.json()["error"]
    for model in ("eta", "counts"):
        assert predict(server, model, [{"restaurant_id": "r1", "distance_km": 1.0}]).status_code == 200


def test_the_embedded_store_reloads_its_file(tmp_path: Path, serve: Callable[..., ServerProcess]) -> None:
    table = tmp_path / "restaurants.csv"
    table.write_text("restaurant_id,incoming_orders,outstanding_per_min\nr1,5,0.5\nr2,7,1.25\n")
    server = serve({"eta": features_toml(str(table), cache_ttl_s="0")})
    one = [{"restaurant_id": "r2", "distance_km": 2.0}]
    assert predict(server, "eta", one).json()["predictions"] == [[2.0, 7.0, 1.25]]
    assert predict(server, "eta", [{"restaurant_id": "r3", "distance_km": 2.0}]).status_code == 404
    table.write_text("restaurant_id,incoming_orders,outstanding_per_min\nr2,11,3\nr3,1,1\n")
    server.wait_for(lambda: predict(server, "eta", one).json()["predictions"] == [[2.0, 11.0, 3.0]], "reload")
    assert predict(server, "eta", [{"restaurant_id": "r3", "distance_km": 2.0}]).status_code == 200


def test_feature_and_prediction_cache_metrics(
    redis_server: RedisServer, serve: Callable[..., ServerProcess]
) -> None:
    fill(redis_server)
    server = serve(
        {
            "eta": "prediction_cache_size = 10\n" + features_toml(redis_server.url),
            "fresh": features_toml(redis_server.url, cache_ttl_s="0", lookup_timeout_ms="300"),
        }
    )
    rows = [{"restaurant_id": r, "distance_km": 1.0} for r in ("r1", "r2", "r1")]
    for _ in range(3):
        assert predict(server, "eta", rows).status_code == 200
    assert predict(server, "eta", rows[:1]).status_code == 200
    redis_server.kill()
    assert predict(server, "fresh", rows).status_code == 503

    table = samples(server)
    store = f"redis://127.0.0.1:{redis_server.port}/0"
    eta = {"model": "eta", "store": store}
    assert value(table, "inferd_feature_round_trips_total", **eta) == 1
    assert value(table, "inferd_feature_lookup_duration_seconds_count", **eta) == 1
    assert value(table, "inferd_feature_cache_total", result="miss", **eta) == 2
    # Three identical requests: one lookup, then the prediction cache answers before any lookup.
    assert value(table, "inferd_prediction_cache_total", model="eta", version="1", result="hit") == 2
    assert value(table, "inferd_prediction_cache_total", model="eta", version="1", result="miss") == 2
    assert value(table, "inferd_feature_cache_total", result="hit", **eta) == 2 + 2 + 1
    fresh = {"model": "fresh", "store": store}
    assert value(table, "inferd_feature_store_errors_total", kind="connection", **fresh) == 1


def test_the_prediction_cache_is_per_version(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_onnx_affine(tmp_path / "m" / "1", scale=1.0)
    (tmp_path / "m" / "inferd.toml").write_text("prediction_cache_size = 4\n")
    server = start_server(str(tmp_path))
    server.wait_for(lambda: server.status("m") == {"1": "AVAILABLE"}, "version 1")
    one = {"instances": [[1.0, 2.0, 3.0, 4.0]]}
    for _ in range(2):
        assert requests.post(f"{server.url}/v1/models/m:predict", json=one, timeout=5).json() == {
            "predictions": [[1.0, 2.0, 3.0, 4.0]]
        }
    assert value(samples(server), "inferd_prediction_cache_total", model="m", version="1", result="hit") == 1
    write_onnx_affine(tmp_path / "m" / "2", scale=3.0)
    server.wait_for(lambda: server.status("m") == {"2": "AVAILABLE", "1": "END"}, "version 2 alone")
    answer = requests.post(f"{server.url}/v1/models/m:predict", json=one, timeout=5).json()
    assert answer == {"predictions": [[3.0, 6.0, 9.0, 12.0]]}
    table = samples(server)
    assert value(table, "inferd_prediction_cache_total", model="m", version="2", result="miss") == 1
    # Version 1 was unloaded, and its cache and counts with it.
    assert not [labels for name, labels in table if dict(labels).get("version") == "1"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_features_load_writes_hashes_and_updates_them_in_place(
    redis_server: RedisServer, tmp_path: Path, suffix: str
) -> None:
    table = tmp_path / f"restaurants{suffix}"

    def write(rows: dict[str, list[object]]) -> None:
        if suffix == ".parquet":
            pq.write_table(pa.table(rows), table)
        else:
            lines = [
                ",".join(rows),
                *(",".join("" if v is None else str(v) for v in r) for r in zip(*rows.values(), strict=True)),
            ]
            table.write_text("\n".join(lines) + "\n")

    def load(*extra: str) -> str:
        argv = [sys.executable, "-m", "inferd", "features", "load", str(table), "--store", redis_server.url]
        done = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=60, check=True)
        return done.stdout + done.stderr

    write({"city": ["b", "b"], "restaurant_id": ["r1", "r2"], "orders": [5, 7], "outstanding": [0.5, 1.25]})
    output = load("--entity", "city,restaurant_id", "--prefix", "rest", "--ttl", "600", "--chunk_rows", "1")
    assert "2/2 rows" in output
    assert re.search(r"loaded 2 rows into redis://\S+ in [\d.]+ s \([\d,]+ rows/s\)", output)
    client = redis_server.client()
    assert client.hgetall("rest:b:r2") == {b"orders": b"7", b"outstanding": b"1.25"}
    assert 0 < client.ttl("rest:b:r2") <= 600

    write({"city": ["b"], "restaurant_id": ["r2"], "orders": [9], "outstanding": [None]})
    load("--entity", "city,restaurant_id", "--prefix", "rest")
    assert client.hgetall("rest:b:r2") == {b"orders": b"9"}
    assert client.hgetall("rest:b:r1") == {b"orders": b"5", b"outstanding": b"0.5"}

    if suffix == ".parquet":  # booleans went in as True and False, which no lookup can read
        write({"city": ["b", "b"], "restaurant_id": ["r1", "r2"], "open": [True, False]})
        load("--entity", "city,restaurant_id", "--prefix", "rest")
        assert [client.hget(f"rest:b:{r}", "open") for r in ("r1", "r2")] == [b"1", b"0"]

    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferd",
            "features",
            "load",
            str(table),
            "--store",
            redis_server.url,
            "--entity",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1
    assert "no entity column(s) ['nope']" in failed.stderr


def test_the_delivery_time_example_end_to_end(redis_server: RedisServer, tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "examples" / "delivery_time"
    out = tmp_path / "delivery"
    run = [sys.executable, str(example / "build.py"), str(out), "--redis", redis_server.url]
    subprocess.run(run, check=True, capture_output=True, timeout=300)
    load = [sys.executable, "-m", "inferd", "features", "load", str(out / "restaurants.parquet")]
    load += ["--store", redis_server.url, "--entity", "restaurant_id", "--prefix", "restaurant"]
    subprocess.run(load, check=True, capture_output=True, timeout=60)
    server = launch(tmp_path, str(out / "models"))
    try:
        models = ("delivery_time", "delivery_time_redis")
        server.wait_for(lambda: all(server.status(m) == {"1": "AVAILABLE"} for m in models), "the models")
        answers = [
            subprocess.run(
                [sys.executable, str(example / "query.py"), server.url, model],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            for model in models
        ]
    finally:
        server.stop()
    assert answers[0] == answers[1]
    assert "v1     r1  1.2 km:" in answers[0]
