"""Batching, padding, splitting, adaptive batch size, load shedding and deadlines, against a real server."""

from __future__ import annotations

import concurrent.futures as cf
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerProcess, launch
from tests.models import write_python_model

# y = 2x per row; n = the number of rows of the predict call that computed the row.
ROW_AWARE = """
thread_safe = True

def load(self):
    pass

def predict(self, inputs):
    x = inputs["x"]
    return {"y": x * 2, "n": np.full(len(x), len(x), dtype=np.int64)}
"""
ROW_AWARE_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}, '
    '{"name": "n", "dtype": "int64", "shape": [-1]}]}'
)


def slow_model(seconds_per_call: float, seconds_per_row: float = 0.0, log: Path | None = None) -> str:
    """A model that sleeps, and optionally appends one line per computed call to ``log``."""
    write = f"        open({str(log)!r}, 'a').write('call\\n')\n" if log else ""
    return (
        "thread_safe = True\n\n"
        "def load(self):\n    pass\n\n"
        "def predict(self, inputs):\n"
        "    import time\n"
        "    x = inputs['x']\n"
        f"    time.sleep({seconds_per_call} + {seconds_per_row} * len(x))\n"
        + (write.replace("        ", "    "))
        + "    return {'y': x * 2, 'n': np.full(len(x), len(x), dtype=np.int64)}\n"
    )


def write_model(base: Path, body: str, batching: str) -> None:
    write_python_model(base / "1", body, ROW_AWARE_SIGNATURE)
    (base / "inferd.toml").write_text(f"[batching]\n{batching}\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("batching")
    write_model(
        repo / "rows", ROW_AWARE, "max_batch_size = 8\nbatch_timeout_micros = 5000\nmax_enqueued_batches = 64"
    )
    write_model(
        repo / "padded",
        ROW_AWARE,
        "max_batch_size = 8\nbatch_timeout_micros = 2000\nallowed_batch_sizes = [4, 8]\n"
        "max_enqueued_batches = 64",
    )
    write_model(
        repo / "tight",
        slow_model(0.3),
        "max_batch_size = 1\nbatch_timeout_micros = 0\nmax_enqueued_batches = 2\nnum_batch_threads = 1",
    )
    write_model(
        repo / "adaptive",
        slow_model(0.002, 0.001),
        "max_batch_size = 64\nbatch_timeout_micros = 10000\nmax_enqueued_batches = 64\n"
        "num_batch_threads = 1\ntarget_p99_ms = 30",
    )
    process = launch(repo, str(repo))
    yield process
    process.stop()


def post(
    server: ServerProcess, model: str, rows: list[list[float]], timeout: float = 30
) -> requests.Response:
    return requests.post(f"{server.url}/v1/models/{model}:predict", json={"instances": rows}, timeout=timeout)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=24))
def test_each_caller_gets_exactly_its_rows_under_concurrency(server: ServerProcess, sizes: list[int]) -> None:
    requests_rows = []
    start = 0.0
    for size in sizes:
        requests_rows.append([[start + i, -(start + i)] for i in range(size)])
        start += size
    with cf.ThreadPoolExecutor(len(sizes)) as pool:
        responses = list(pool.map(lambda rows: post(server, "rows", rows), requests_rows))
    for rows, response in zip(requests_rows, responses, strict=True):
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["y"] for p in predictions] == [[2 * a, 2 * b] for a, b in rows]
        assert all(1 <= p["n"] <= 8 for p in predictions)  # never more than max_batch_size per call


def test_concurrent_requests_are_merged_into_batches(server: ServerProcess) -> None:
    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: post(server, "rows", [[float(i), 0.0]]), range(64)))
    batch_sizes = [r.json()["predictions"][0]["n"] for r in responses]
    assert max(batch_sizes) > 1


def test_batches_are_padded_to_allowed_sizes_and_large_requests_split(server: ServerProcess) -> None:
    response = post(server, "padded", [[1.0, 2.0]] * 3)
    assert response.json()["predictions"] == [{"y": [2.0, 4.0], "n": 4}] * 3  # 3 rows padded to 4
    response = post(server, "padded", [[float(i), 0.0] for i in range(20)])  # over max_batch_size 8
    predictions = response.json()["predictions"]
    assert [p["y"][0] for p in predictions] == [2.0 * i for i in range(20)]
    assert {p["n"] for p in predictions} <= {4, 8}


def test_a_full_queue_is_refused_at_once_with_503_and_retry_after(server: ServerProcess) -> None:
    with cf.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda i: post(server, "tight", [[1.0, 1.0]]), range(12)))
    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert refused
    assert served
    assert len(refused) + len(served) == 12
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert "queue is full" in refused[0].json()["error"]
    assert post(server, "tight", [[1.0, 1.0]]).status_code == 200  # and it recovers


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in /metrics")


def test_adaptive_batching_settles_on_the_batch_size_that_meets_the_objective(server: ServerProcess) -> None:
    # Each call sleeps 2 ms + 1 ms per row; the objective of 30 ms leaves 15 ms per batch, so the
    # batch size should settle near 13 rows: far above 1 and far below the maximum of 64.
    stop = time.monotonic() + 6
    with cf.ThreadPoolExecutor(32) as pool:

        def drive(_: int) -> None:
            while time.monotonic() < stop:
                assert post(server, "adaptive", [[1.0, 1.0]]).status_code == 200

        list(pool.map(drive, range(32)))
    size = metric(server, "inferd_batcher_target_batch_size", model="adaptive")
    assert 4 <= size <= 20, size
    assert metric(server, "inferd_batcher_wait_seconds", model="adaptive") <= 0.010


def test_requests_past_their_deadline_are_dropped_before_they_are_computed(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    calls = tmp_path / "calls.log"
    write_model(
        tmp_path / "repo" / "slow",
        slow_model(0.25, log=calls),
        "max_batch_size = 1\nbatch_timeout_micros = 0\nnum_batch_threads = 1\nmax_enqueued_batches = 100",
    )
    server = start_server(str(tmp_path / "repo"), "--rest_api_timeout_in_ms=600")
    server.wait_for(lambda: server.status("slow") == {"1": "AVAILABLE"}, "the slow model")
    calls.write_text("")  # forget the warm-up call
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: post(server, "slow", [[1.0, 1.0]]), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes
    assert 504 in codes
    timed_out = [r for r in responses if r.status_code == 504]
    assert re.search(r"longer than 600 ms", timed_out[0].json()["error"])
    time.sleep(1.0)  # let anything still queued run, if the server wrongly kept it
    computed = len(calls.read_text().splitlines())
    assert computed < len(responses)  # the expired requests were not computed
    assert computed <= codes.count(200) + 1  # at most the call running when its deadline passed


def test_unbatched_requests_beyond_max_in_flight_are_refused(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_python_model(tmp_path / "repo" / "slow" / "1", slow_model(0.3), ROW_AWARE_SIGNATURE)
    server = start_server(str(tmp_path / "repo"), "--max_in_flight=2")
    server.wait_for(lambda: server.status("slow") == {"1": "AVAILABLE"}, "the slow model")
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: post(server, "slow", [[1.0, 1.0]]), range(8)))
    codes = [r.status_code for r in responses]
    assert codes.count(503) >= 1
    assert codes.count(200) >= 2
    assert np.all([c in (200, 503) for c in codes])


def test_tf_serving_batching_flags(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    write_python_model(tmp_path / "m" / "1", ROW_AWARE, ROW_AWARE_SIGNATURE)
    params = tmp_path / "batching.config"
    params.write_text(
        "max_batch_size { value: 4 }\nbatch_timeout_micros { value: 1000 }\n"
        "max_enqueued_batches { value: 50 }\nnum_batch_threads { value: 2 }\n"
        "allowed_batch_sizes: 2\nallowed_batch_sizes: 4\n"
    )
    server = start_server(
        "--model_name=m",
        f"--model_base_path={tmp_path / 'm'}",
        "--enable_batching",
        f"--batching_parameters_file={params}",
    )
    server.wait_for(lambda: server.status("m") == {"1": "AVAILABLE"}, "the model")
    predictions = post(server, "m", [[1.0, 1.0]] * 3).json()["predictions"]
    assert [p["n"] for p in predictions] == [4, 4, 4]  # padded to the allowed size 4
    predictions = post(server, "m", [[1.0, 1.0]] * 9).json()["predictions"]
    assert len(predictions) == 9
    assert {p["n"] for p in predictions} <= {2, 4}


def test_batching_parameters_file_without_enable_batching_is_an_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    params = tmp_path / "b.config"
    params.write_text("max_batch_size { value: 4 }\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferd",
            "serve",
            "--model_base_path=/nonexistent",
            f"--batching_parameters_file={params}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--batching_parameters_file needs --enable_batching" in out.stderr


def test_a_request_larger_than_the_whole_queue_is_refused_with_400(server: ServerProcess) -> None:
    response = post(server, "tight", [[1.0, 1.0]] * 3)  # its queue holds 2 rows
    assert response.status_code == 400
    assert "3 rows, more than its model's batching queue holds (2" in response.json()["error"]
