"""Version swaps of a model with batching, features and a prediction cache: a retired version
leaves nothing behind, neither in ``/metrics`` nor in the process's memory."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess
from tests.models import features_toml, write_python_model

SWAPS = 20
ENTITIES = 40_000
"""Entities each version looks up: its entity cache holds them all (several MiB), so a retired
version whose cache stays alive shows in the resident memory."""

ECHO = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": inputs["x"]}
"""
SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]}'
)


def write_version(base: Path, version: int) -> None:
    """A python echo model, moved into ``base/version`` whole."""
    staging = base / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    write_python_model(staging, ECHO, SIGNATURE)
    staging.rename(base / str(version))


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


def versions_labelled(server: ServerProcess) -> dict[str, set[str]]:
    """Metric family -> the version label values it reports (the unknown-model "" left out)."""
    page = requests.get(f"{server.url}/metrics", timeout=5).text
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.labels.get("version"):
                found.setdefault(family.name, set()).add(sample.labels["version"])
    return found


def test_twenty_swaps_leave_only_the_served_version_in_metrics_and_memory(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    table = tmp_path / "restaurants.csv"
    rows = (f"r{i},{i % 17},{i % 5}.5" for i in range(ENTITIES))
    table.write_text("restaurant_id,incoming_orders,outstanding_per_min\n" + "\n".join(rows) + "\n")
    base = tmp_path / "repo" / "eta"
    base.mkdir(parents=True)
    (base / "inferd.toml").write_text(
        "prediction_cache_size = 8\n"
        + features_toml(str(table), lookup_timeout_ms="30000")
        + "[batching]\nmax_batch_size = 4096\nbatch_timeout_micros = 0\n"
    )
    write_version(base, 1)
    server = start_server(f"--model_base_path={base}", "--model_name=eta")
    body = {
        "inputs": {
            "restaurant_id": [f"r{i}" for i in range(ENTITIES)],
            "distance_km": [1.0] * ENTITIES,
        }
    }
    measured: dict[int, int] = {}
    for version in range(1, SWAPS + 2):
        if version > 1:
            write_version(base, version)
        alone = {str(n): "AVAILABLE" if n == version else "END" for n in range(1, version + 1)}
        server.wait_for(lambda: server.status("eta") == alone, f"version {version} alone serving")  # noqa: B023
        for _ in range(2):  # the second is answered from the prediction cache
            answer = requests.post(f"{server.url}/v1/models/eta:predict", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            outputs = answer.json()["outputs"]
            assert (outputs["y"] if isinstance(outputs, dict) else outputs)[7] == [1.0, 7.0, 2.5]
        measured[version] = resident_bytes(server.process.pid)

    served = str(SWAPS + 1)
    labelled = versions_labelled(server)
    for family in (
        "inferd_requests",
        "inferd_batch_size",
        "inferd_queue_rows",
        "inferd_batcher_target_batch_size",
        "inferd_batcher_wait_seconds",
        "inferd_prediction_cache",
    ):
        assert labelled.get(family) == {served}, (family, labelled)
    assert all(versions == {served} for versions in labelled.values()), labelled
    # After the first swaps the process holds one version's caches; twenty retired versions
    # holding theirs would add several times the margin.
    grown = measured[SWAPS + 1] - measured[5]
    assert grown < 64 * 2**20, {v: f"{b / 2**20:.0f} MiB" for v, b in measured.items()}
