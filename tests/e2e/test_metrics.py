"""Prometheus metrics after known traffic, on /metrics and TF Serving's monitoring path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess
from tests.models import write_onnx_affine, write_python_model

ONE = {"instances": [[1.0, 2.0, 3.0, 4.0]]}


def samples(
    server: ServerProcess, path: str = "/metrics"
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = requests.get(f"{server.url}{path}", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(table: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return table[(name, frozenset(labels.items()))]


def test_metrics_count_known_traffic_by_model_version_protocol_status_and_stage(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_onnx_affine(tmp_path / "m" / "3", scale=2.0)
    config = tmp_path / "monitoring.config"
    config.write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n')
    server = start_server(
        "--model_name=m", f"--model_base_path={tmp_path / 'm'}", f"--monitoring_config_file={config}"
    )
    server.wait_for(lambda: server.status("m") == {"3": "AVAILABLE"}, "the model")

    for _ in range(5):
        assert requests.post(f"{server.url}/v1/models/m:predict", json=ONE, timeout=5).status_code == 200
    for body in (b"{", b'{"instances": [["a", "b", "c", "d"]]}'):
        assert requests.post(f"{server.url}/v1/models/m:predict", data=body, timeout=5).status_code == 400
    assert requests.post(f"{server.url}/v1/models/nosuch:predict", json=ONE, timeout=5).status_code == 404

    table = samples(server)
    ok = {"model": "m", "version": "3", "protocol": "tfserving_rest", "status": "OK"}
    assert value(table, "inferd_requests_total", **ok) == 5
    bad = {"model": "m", "version": "", "protocol": "tfserving_rest", "status": "INVALID_ARGUMENT"}
    assert value(table, "inferd_requests_total", **bad) == 2
    # An unknown model name is not a label value (labels stay a bounded set).
    unknown = {"model": "", "version": "", "protocol": "tfserving_rest", "status": "NOT_FOUND"}
    assert value(table, "inferd_requests_total", **unknown) == 1
    parts = ("decode", "features", "queue", "predict", "handoff", "encode")
    seconds = {}
    for stage in (*parts, "total"):
        labels = {"model": "m", "version": "3", "protocol": "tfserving_rest", "stage": stage}
        assert value(table, "inferd_request_duration_seconds_count", **labels) == 5
        seconds[stage] = value(table, "inferd_request_duration_seconds_sum", **labels)
        assert seconds[stage] >= 0
    assert seconds["features"] == 0  # the model has no [features]
    assert 0 < seconds["predict"] < seconds["total"]
    # the stages partition the request's time
    assert sum(seconds[p] for p in parts) == pytest.approx(seconds["total"], rel=0.01, abs=1e-5)
    assert value(table, "inferd_model_load_duration_seconds_count", model="m") == 1
    assert value(table, "inferd_in_flight_requests") == 0
    assert value(table, "process_resident_memory_bytes") > 10_000_000
    assert value(table, "process_cpu_seconds_total") > 0

    # V2 REST requests are timed by stage too.
    inputs = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    assert requests.post(f"{server.url}/v2/models/m/infer", json=inputs, timeout=5).status_code == 200
    v2_total = {"model": "m", "version": "3", "protocol": "v2_rest", "stage": "total"}
    assert value(samples(server), "inferd_request_duration_seconds_count", **v2_total) == 1

    # TF Serving's path serves the same metrics.
    tf = samples(server, "/monitoring/prometheus/metrics")
    assert value(tf, "inferd_requests_total", **ok) == 5


def test_batch_size_queue_and_load_failure_metrics(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    write_onnx_affine(base / "1", scale=1.0)
    (base / "inferd.toml").write_text("[batching]\nmax_batch_size = 8\nbatch_timeout_micros = 1000\n")
    server = start_server("--model_name=m", f"--model_base_path={base}")
    server.wait_for(lambda: server.status("m") == {"1": "AVAILABLE"}, "the model")
    body = {"instances": [[1.0, 2.0, 3.0, 4.0]] * 3}
    for _ in range(4):
        assert requests.post(f"{server.url}/v1/models/m:predict", json=body, timeout=5).status_code == 200
    (base / "2").mkdir()
    (base / "2" / "model.onnx").write_bytes(b"corrupt")
    server.wait_for(lambda: server.status("m").get("2") == "END", "version 2 to fail")

    table = samples(server)
    assert value(table, "inferd_batch_size_sum", model="m", version="1") == 12
    assert value(table, "inferd_batch_size_count", model="m", version="1") <= 4
    assert value(table, "inferd_queue_rows", model="m", version="1") == 0
    assert value(table, "inferd_batcher_target_batch_size", model="m", version="1") == 8
    assert value(table, "inferd_model_load_failures_total", model="m") == 1


def test_a_request_past_its_deadline_or_left_by_its_client_is_counted(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A model that never answers in time shows in inferd_requests_total (and so in a canary's
    error_rate guard): such requests used to be counted nowhere, their work being cancelled."""
    slow = """
    def load(self):
        pass

    def predict(self, inputs):
        import time
        if (inputs["x"] > 5).any():
            time.sleep(2)
        return {"y": inputs["x"]}
    """
    write_python_model(tmp_path / "p" / "1", slow)
    server = start_server(
        "--model_name=p", f"--model_base_path={tmp_path / 'p'}", "--rest_api_timeout_in_ms=300"
    )
    url, late = f"{server.url}/v1/models/p:predict", {"instances": [[9, 1]]}
    assert requests.post(url, json=late, timeout=10).status_code == 504
    with pytest.raises(requests.Timeout):  # the client gives up before the server's deadline
        requests.post(url, json=late, timeout=0.1)

    def counted() -> bool:
        table = samples(server)
        deadline = {"model": "p", "version": "1", "protocol": "tfserving_rest", "status": "DEADLINE_EXCEEDED"}
        gone = {"model": "p", "version": "", "protocol": "tfserving_rest", "status": "CANCELLED"}
        return table.get(("inferd_requests_total", frozenset(deadline.items()))) == 1 and (
            table.get(("inferd_requests_total", frozenset(gone.items()))) == 1
        )

    server.wait_for(counted, "the late and the abandoned request counted")


def test_metrics_can_be_turned_off(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    write_onnx_affine(tmp_path / "m" / "1", scale=1.0)
    server = start_server("--model_name=m", f"--model_base_path={tmp_path / 'm'}", "--enable_metrics=false")
    server.wait_for(lambda: server.status("m") == {"1": "AVAILABLE"}, "the model")
    assert requests.post(f"{server.url}/v1/models/m:predict", json=ONE, timeout=5).status_code == 200
    assert requests.get(f"{server.url}/metrics", timeout=5).status_code == 404
