"""Many models under one memory budget, against a real server: lazy loads, eviction, pinning,
and a request that holds a version while it is evicted.

The soak is the issue's: a minute of traffic (``SOAK_S``) from 8 clients, which makes hundreds
of loads and evictions.
"""

from __future__ import annotations

import itertools
import random
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

from inferd.usage import read_pid
from tests.conftest import ServerProcess
from tests.models import write_onnx_table, write_python_model

MiB = 2**20
SOAK_S = 60.0
CLIENTS = 8
SIZES_MIB = [1, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]  # 42 MiB in all: three times the budget
# (the largest reserves 3 x 4 MiB while it loads: onnxruntime's peak, see residency.LOAD_FACTORS)
BUDGET_MIB = sum(SIZES_MIB) // 3


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    """The value of one sample in ``/metrics`` (0 when absent)."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def infer(url: str, model: str, rows: list[int], session: requests.Session) -> requests.Response:
    body = {"inputs": [{"name": "i", "datatype": "INT64", "shape": [len(rows)], "data": rows}]}
    return session.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)


def test_twelve_models_three_times_the_budget_share_it_under_concurrent_traffic(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    tables = {}
    for n, mib in enumerate(SIZES_MIB):
        name = f"m{n:02d}"
        tables[name] = write_onnx_table(tmp_path / "repo" / name / "1", mib, seed=n)
    pinned = "m00"
    (tmp_path / "repo" / pinned / "inferd.toml").write_text("[residency]\npin = true\n")
    server = start_server(str(tmp_path / "repo"), f"--memory_budget={BUDGET_MIB}MiB", "--admin_token=t")
    server.wait_for(lambda: server.status(pinned) == {"1": "AVAILABLE"}, "the pinned model loaded at start")
    assert server.status("m05") == {"1": "END"}  # listed, not loaded
    admin = {"Authorization": "Bearer t"}
    index = requests.post(f"{server.url}/v2/repository/index", json={}, headers=admin, timeout=5).json()
    cold = next(row for row in index if row["name"] == "m05")
    assert cold["state"] == "UNAVAILABLE"
    assert "loads on its first request" in cold["reason"]
    warm_up = infer(server.url, pinned, [0], requests.Session())  # the request path's own memory
    assert warm_up.status_code == 200, warm_up.text
    _, baseline = read_pid(server.process.pid)
    limit = (baseline + BUDGET_MIB * MiB) * 1.1

    stop = threading.Event()
    samples: list[int] = []
    pinned_states: set[str] = set()
    answers: Counter[str] = Counter()
    problems: list[str] = []

    def sample() -> None:
        ticks = 0
        while not stop.is_set():
            samples.append(read_pid(server.process.pid)[1])
            ticks += 1
            if ticks % 5 == 0:
                pinned_states.update(server.status(pinned).values())
            stop.wait(0.1)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        order = list(tables)
        rng.shuffle(order)
        session = requests.Session()
        for model in itertools.cycle(order):
            if stop.is_set():
                return
            rows = [rng.randrange(len(tables[model])) for _ in range(3)]
            response = infer(server.url, model, rows, session)
            answers[str(response.status_code)] += 1
            if response.status_code == 503:
                if "retry-after" not in response.headers:
                    problems.append(f"{model}: 503 without Retry-After")
                continue
            if response.status_code != 200:
                problems.append(f"{model}: {response.status_code} {response.text[:200]}")
                continue
            (output,) = response.json()["outputs"]
            got = np.asarray(output["data"], dtype=np.float32).reshape(3, 16)
            if not np.array_equal(got, tables[model][rows]):
                problems.append(f"{model}: rows {rows} differ from the model's own table")

    sampler = threading.Thread(target=sample)
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
    sampler.start()
    for thread in clients:
        thread.start()
    stop.wait(SOAK_S)
    stop.set()
    for thread in [*clients, sampler]:
        thread.join(120)

    assert problems == []
    assert answers["200"] > 0
    assert set(answers) <= {"200", "503"}
    assert max(samples) <= limit, (
        f"peak RSS {max(samples) / MiB:.1f} MiB over the limit {limit / MiB:.1f} MiB "
        f"(idle baseline {baseline / MiB:.1f} MiB + budget {BUDGET_MIB} MiB, +10%)"
    )
    assert pinned_states == {"AVAILABLE"}
    assert metric(server, "inferd_model_evictions_total", 'reason="budget"') > 0
    assert metric(server, "inferd_model_loads_total", 'cause="reload"') > 0
    assert metric(server, "inferd_memory_used_bytes", 'device="cpu"') <= BUDGET_MIB * MiB
    assert metric(server, "inferd_memory_budget_bytes", 'device="cpu"') == BUDGET_MIB * MiB
    assert metric(server, "inferd_cold_start_seconds_count") > 0


SLOW_MODEL = """
def load(self):
    from pathlib import Path
    self.folder = Path(__file__).parent
    self.weights = np.load(self.folder / "weights.npy")

def predict(self, inputs):
    import time
    x = inputs["x"]
    if x.size and x.flat[0] == 1:  # hold the request until the test lets it go (bounded)
        give_up = time.monotonic() + 60
        while not (self.folder.parents[2] / "release").exists() and time.monotonic() < give_up:
            time.sleep(0.01)
    return {"y": x + float(self.weights[0])}
"""


def test_a_request_holding_a_version_that_is_evicted_completes(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    slow = tmp_path / "repo" / "slow" / "1"
    write_python_model(slow, SLOW_MODEL)
    np.save(slow / "weights.npy", np.full(4 * MiB // 8, 0.5))
    table = write_onnx_table(tmp_path / "repo" / "table" / "1", 4, seed=7)
    server = start_server(str(tmp_path / "repo"), "--memory_budget=14MiB", "--load_wait_ms=60000")
    held: list[requests.Response] = []
    holder = threading.Thread(
        target=lambda: held.append(
            requests.post(f"{server.url}/v1/models/slow:predict", json={"instances": [[1, 2]]}, timeout=120)
        )
    )
    holder.start()
    server.wait_for(lambda: server.status("slow") == {"1": "AVAILABLE"}, "the slow model loaded")
    server.wait_for(lambda: metric(server, "inferd_in_flight_requests") == 1, "the request in predict")
    other: list[requests.Response] = []
    loader = threading.Thread(
        target=lambda: other.append(infer(server.url, "table", [5], requests.Session()))
    )
    loader.start()  # the table needs room that only the slow model, busy, can give
    server.wait_for(
        lambda: metric(server, "inferd_model_evictions_total", 'reason="budget"') == 1, "slow chosen"
    )
    assert holder.is_alive()
    assert "unloading slow:1 (budget; 1 request(s) in flight)" in server.log()
    assert server.status("slow") == {"1": "END"}  # new requests would load it again
    (tmp_path / "release").touch()  # outside the repository, whose scans would see a new version
    holder.join(120)
    loader.join(120)
    assert held[0].status_code == 200, held[0].text
    assert held[0].json() == {"predictions": [[1.5, 2.5]]}
    assert other[0].status_code == 200, other[0].text
    got = np.asarray(other[0].json()["outputs"][0]["data"], dtype=np.float32)
    assert np.array_equal(got, table[5])
    (status,) = requests.get(f"{server.url}/v1/models/slow", timeout=5).json()["model_version_status"]
    assert status["status"]["error_message"].startswith("evicted (budget)")


def test_a_repository_load_under_a_budget_loads_the_model_at_once(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_onnx_table(tmp_path / "repo" / "table" / "1", 1, seed=3)
    server = start_server(
        str(tmp_path / "repo"), "--memory_budget=14MiB", "--load_wait_ms=60000", "--admin_token=t"
    )
    assert server.status("table") == {"1": "END"}  # listed cold
    load = requests.post(
        f"{server.url}/v2/repository/models/table/load",
        json={},
        headers={"Authorization": "Bearer t"},
        timeout=120,
    )
    assert load.status_code == 200, load.text
    assert server.status("table") == {"1": "AVAILABLE"}
    assert metric(server, "inferd_model_loads_total", 'cause="cold"') == 1


def test_weights_inside_model_onnx_are_mapped_from_a_copy_written_at_the_first_load(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    table = write_onnx_table(tmp_path / "repo" / "table" / "1", 4, seed=5)
    settings = "[onnx]\nshare_weights = true\n[residency]\nidle_unload_s = 1\n"
    (tmp_path / "repo" / "table" / "inferd.toml").write_text(settings)
    cache = tmp_path / "cache"
    server = start_server(str(tmp_path / "repo"), "--memory_budget=64MiB", f"--model_cache_dir={cache}")
    session = requests.Session()
    for load, cause in ((1, "cold"), (2, "reload")):  # the load that writes the copy, then one that maps it
        answer = infer(server.url, "table", [5, 9], session)
        assert answer.status_code == 200, answer.text
        got = np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 16)
        assert np.array_equal(got, table[[5, 9]])
        assert metric(server, "inferd_model_loads_total", f'cause="{cause}"') == 1
        [weights] = (cache / "derived" / "onnx-mapped").glob("*/weights.bin")
        if load == 1:
            written = weights.stat().st_mtime_ns
            assert "weights written as external data to" in server.log()
            server.wait_for(
                lambda: metric(server, "inferd_model_evictions_total", 'reason="idle"') == 1, "idle unload"
            )
    assert weights.stat().st_mtime_ns == written  # the second load used the copy as it was
    assert server.log().count("weights written as external data to") == 1
