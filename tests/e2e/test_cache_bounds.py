"""End to end: what clients choose cannot grow the server's caches past their byte budgets.

Unknown entities with huge keys, many distinct unknown entities, and many distinct large
requests to a model with a prediction cache each sent in a bounded loop; the server's resident
memory (VmRSS) afterwards stays within the configured budget plus a margin for the allocator,
where before the caches held every request (hundreds of MiB for the same loops).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import ServerProcess, launch
from tests.e2e.test_metrics import samples, value
from tests.models import features_toml, write_python_model

MIB = 1024 * 1024
ENTITY_CACHE_BYTES = 4 * MIB
PREDICTION_CACHE_BYTES = 8 * MIB
MARGIN = 48 * MIB
"""Growth allowed beyond a budget: the allocator's arenas, buffers of the last requests."""

ECHO = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": inputs["x"]}
"""
EXACT_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]}'
)
WIDE_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1]}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, -1]}]}'
)


def rss(server: ServerProcess) -> int:
    """The server's resident memory now, in bytes (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/<pid>/status")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    table = repo.parent / "restaurants.csv"
    table.write_text("restaurant_id,incoming_orders,outstanding_per_min\nr1,5,0.5\n")
    write_python_model(repo / "eta" / "1", ECHO, EXACT_SIGNATURE)
    (repo / "eta" / "inferd.toml").write_text(
        features_toml(str(table), cache_ttl_s="600", cache_bytes=str(ENTITY_CACHE_BYTES))
    )
    write_python_model(repo / "cached" / "1", ECHO, WIDE_SIGNATURE)
    (repo / "cached" / "inferd.toml").write_text(
        f"prediction_cache_size = 100000\nprediction_cache_bytes = {PREDICTION_CACHE_BYTES}\n"
    )
    server = launch(tmp_path_factory.mktemp("log"), str(repo))
    server.wait_for(lambda: server.status("eta") == server.status("cached") == {"1": "AVAILABLE"}, "models")
    yield server
    server.stop()


def _predict(server: ServerProcess, entities: list[str]) -> requests.Response:
    instances = [{"restaurant_id": entity, "distance_km": 1.0} for entity in entities]
    return requests.post(f"{server.url}/v1/models/eta:predict", json={"instances": instances}, timeout=30)


def test_unknown_entities_with_huge_keys_are_not_held(server: ServerProcess) -> None:
    """150 requests naming unknown 1 MiB entities: +163 MiB before (each key cached as missing)."""
    assert _predict(server, ["r1"]).status_code == 200
    for i in range(5):  # warm the allocator with the request sizes to come
        assert _predict(server, [f"{i:07d}" + "k" * (MIB - 7)]).status_code == 404
    before = rss(server)
    for i in range(150):
        response = _predict(server, [f"{i:07d}" + "u" * (MIB - 7)])
        assert response.status_code == 404, response.text[:200]
    grown = rss(server) - before
    assert grown < MARGIN, f"RSS grew {grown / MIB:.0f} MiB over 150 unknown 1 MiB keys"
    assert _predict(server, ["r1"]).status_code == 200  # the cache still works for real keys


def test_many_distinct_unknown_entities_stay_within_cache_bytes(server: ServerProcess) -> None:
    """100 requests of 1,000 distinct 900-byte unknown keys: +115 MiB before (bounded by count only)."""
    for i in range(3):
        assert _predict(server, [f"w{i}-{j:04d}" + "k" * 890 for j in range(1000)]).status_code == 404
    before = rss(server)
    for i in range(100):
        response = _predict(server, [f"{i:03d}-{j:04d}" + "e" * 890 for j in range(1000)])
        assert response.status_code == 404, response.text[:200]
    grown = rss(server) - before
    assert grown < ENTITY_CACHE_BYTES + MARGIN, f"RSS grew {grown / MIB:.0f} MiB; budget {ENTITY_CACHE_BYTES}"


def _infer_binary(server: ServerProcess, x: np.ndarray) -> requests.Response:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return requests.post(
        f"{server.url}/v2/models/cached/infer",
        data=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )


def test_distinct_large_requests_stay_within_prediction_cache_bytes(server: ServerProcess) -> None:
    """60 distinct 2 MiB requests: each cached with its answer, +243 MiB before."""
    small = np.ones((1, 4), np.float32)
    assert _infer_binary(server, small).status_code == 200
    for i in range(5):
        assert _infer_binary(server, np.full((1, MIB // 2), -i, np.float32)).status_code == 200
    before = rss(server)
    for i in range(60):
        response = _infer_binary(server, np.full((1, MIB // 2), i, np.float32))
        assert response.status_code == 200, response.text[:200]
    grown = rss(server) - before
    assert grown < PREDICTION_CACHE_BYTES + MARGIN, (
        f"RSS grew {grown / MIB:.0f} MiB; budget {PREDICTION_CACHE_BYTES / MIB:.0f} MiB"
    )
    assert _infer_binary(server, small).status_code == 200  # evicted by the large ones: cached again
    hits = value(samples(server), "inferd_prediction_cache_total", model="cached", version="1", result="hit")
    assert _infer_binary(server, small).status_code == 200  # and answered from the cache
    after = value(samples(server), "inferd_prediction_cache_total", model="cached", version="1", result="hit")
    assert after == hits + 1
