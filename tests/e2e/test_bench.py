"""``inferd bench`` against a running inferd in every protocol, checked against the server's own
Prometheus metrics: every request the bench sent is one the server counted, with the same
outcome, and the bench's latencies are no shorter than the server's own."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess
from tests.models import write_onnx_digits, write_onnx_two_inputs, write_python_model

# Bench protocol -> the server's metric label and the status names each side uses.
PROTOCOLS = {
    "rest": ("tfserving_rest", "200", "400"),
    "v2": ("v2_rest", "200", "400"),
    "v2-binary": ("v2_rest", "200", "400"),
    "grpc": ("tfserving_grpc", "OK", "INVALID_ARGUMENT"),
    "v2-grpc": ("v2_grpc", "OK", "INVALID_ARGUMENT"),
}


def bench(target: str, *args: object, status: int = 0) -> dict[str, object]:
    """Run ``inferd bench``, expecting exit ``status`` (1: every request failed), and its report."""
    argv = [sys.executable, "-m", "inferd", "bench", target, *map(str, args), "--json=-"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def server_counts(server: ServerProcess, protocol: str) -> dict[str, float]:
    """Status -> inferd_requests_total for one protocol label."""
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inferd_requests_total" and sample.labels["protocol"] == protocol:
                status = sample.labels["status"]
                counts[status] = counts.get(status, 0) + sample.value
    return counts


def server_total_buckets(server: ServerProcess, protocol: str) -> list[tuple[float, float]]:
    """(upper bound s, cumulative count) of the server's total request duration histogram."""
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    return [
        (float(sample.labels["le"]), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "inferd_request_duration_seconds_bucket"
        and sample.labels["protocol"] == protocol
        and sample.labels["stage"] == "total"
    ]


def lower_bound_s(buckets: list[tuple[float, float]], quantile: float) -> float:
    """The lower edge of the bucket holding the server-side ``quantile``."""
    total = buckets[-1][1]
    previous = 0.0
    for bound, count in buckets:
        if count >= quantile * total:
            return previous
        previous = bound
    return previous


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from tests.conftest import launch

    root = tmp_path_factory.mktemp("bench")
    write_onnx_digits(root / "repo" / "digits" / "1")
    write_onnx_two_inputs(root / "repo" / "two" / "1")
    write_python_model(
        root / "repo" / "slow" / "1",
        """
        def load(self):
            pass

        def predict(self, inputs):
            import time
            time.sleep(0.02)
            return {"y": inputs["x"]}
        """,
    )
    (root / "repo" / "slow" / "inferd.toml").write_text(
        "[batching]\nmax_batch_size = 1\nnum_batch_threads = 1\nmax_enqueued_batches = 200\n"
    )
    process = launch(root, str(root / "repo"))
    process.wait_for(
        lambda: all(process.status(m) == {"1": "AVAILABLE"} for m in ("digits", "two", "slow")), "the models"
    )
    yield process
    process.stop()


def target(server: ServerProcess, protocol: str) -> str:
    return server.grpc_target if protocol.endswith("grpc") else server.url


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_counts_errors_and_percentiles_agree_with_the_server_metrics(
    server: ServerProcess, protocol: str, tmp_path: Path
) -> None:
    label, ok, bad = PROTOCOLS[protocol]
    before = server_counts(server, label)
    good = bench(
        target(server, protocol),
        "--model=digits",
        f"--protocol={protocol}",
        "--instances=3",
        "--concurrency=1,4",
        "--duration=0.5",
        "--warmup=0.2",
    )
    np.save(tmp_path / "bad.npy", np.zeros((2, 63), np.float32))  # the model takes 64 values per row
    wrong = bench(
        target(server, protocol),
        "--model=digits",
        f"--protocol={protocol}",
        "--concurrency=2",
        f"--payload={tmp_path / 'bad.npy'}",
        "--duration=0.3",
        "--warmup=0.1",
        status=1,
    )
    after = server_counts(server, label)

    steps = [*good["steps"], *wrong["steps"]]  # type: ignore[misc]
    sent_ok = sum(step["all_statuses"].get(ok, 0) for step in steps)
    sent_bad = sum(step["all_statuses"].get(bad, 0) for step in steps)
    assert sent_ok > 0
    assert sent_bad > 0
    assert after.get("OK", 0) - before.get("OK", 0) == sent_ok
    assert after.get("INVALID_ARGUMENT", 0) - before.get("INVALID_ARGUMENT", 0) == sent_bad
    assert sum(sum(step["all_statuses"].values()) for step in steps) == sent_ok + sent_bad

    for step in good["steps"]:  # type: ignore[attr-defined]
        assert step["errors"] == {}
        assert step["predictions_per_s"] == pytest.approx(3 * step["requests_per_s"])
        latency = step["latency_ms"]
        assert latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    (wrong_step,) = wrong["steps"]  # type: ignore[misc]
    assert wrong_step["errors"] == {bad: wrong_step["requests"]}
    assert wrong_step["latency_ms"]["p50"] is None  # latencies are of successful requests

    # A client waits at least as long as the server works, so the bench's median (at most the
    # larger of its steps' medians) is no lower than the lower edge of the server's median bucket.
    buckets = server_total_buckets(server, label)
    median_ms = max(step["latency_ms"]["p50"] for step in good["steps"])  # type: ignore[attr-defined]
    assert median_ms >= lower_bound_s(buckets, 0.5) * 1000


def test_open_loop_keeps_its_schedule_when_the_server_is_slower(server: ServerProcess) -> None:
    before = server_counts(server, "tfserving_rest")
    # The slow model takes 20 ms per request, one at a time: 50/s at most, offered 80/s.
    report = bench(server.url, "--model=slow", "--rate=80", "--duration=1", "--warmup=0", "--timeout=30")
    (step,) = report["steps"]  # type: ignore[misc]
    assert step["mode"] == "open"
    assert abs(step["requests"] - 80) <= 1  # every request due in the window was sent and counted
    assert step["errors"] == {}
    # Requests queued behind the slow server wait, and that wait is counted from when each was due.
    assert step["latency_ms"]["max"] > step["latency_ms"]["p50"]
    assert server_counts(server, "tfserving_rest")["OK"] - before.get("OK", 0) == step["all_statuses"]["200"]


def test_several_processes_server_pid_metrics_plot_and_two_inputs(
    server: ServerProcess, tmp_path: Path
) -> None:
    before = server_counts(server, "tfserving_grpc")
    plot = tmp_path / "latency.png"
    argv = [
        sys.executable,
        "-m",
        "inferd",
        "bench",
        server.grpc_target,
        "--model=two",
        "--protocol=grpc",
        "--concurrency=2,4",
        "--processes=2",
        "--duration=0.5",
        "--warmup=0.2",
        f"--server-pid={server.process.pid}",
        "--price-per-hour=3.6",
        f"--plot={plot}",
        f"--json={tmp_path / 'report.json'}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "p99.9 ms" in done.stdout  # the table
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["level"] for s in report["steps"]] == [2, 4]
    for step in report["steps"]:
        assert step["errors"] == {}
        assert step["server_cpu_s_per_1k_predictions"] > 0
        assert step["server_peak_memory_bytes"] > 10 * 2**20
        # $3.6 per hour is $0.001 per second: per million predictions, 1000 / (predictions/s).
        assert step["cost_per_million_predictions"] == pytest.approx(1000 / step["predictions_per_s"])
    sent = sum(step["all_statuses"]["OK"] for step in report["steps"])
    assert server_counts(server, "tfserving_grpc")["OK"] - before.get("OK", 0) == sent
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_metrics_page_and_metadata_url_and_bad_options_are_refused(server: ServerProcess) -> None:
    report = bench(server.url, "--model=digits", "--protocol=v2", "--duration=0.3", "--warmup=0.1")
    (step,) = report["steps"]  # type: ignore[misc]
    assert step["server_peak_memory_bytes"] > 10 * 2**20  # found at URL/metrics by itself
    metadata = f"--metadata-url={server.url}"
    over_grpc = bench(server.grpc_target, "--model=digits", "--protocol=v2-grpc", metadata, "--duration=0.2")
    assert over_grpc["steps"][0]["errors"] == {}  # type: ignore[index]
    done = subprocess.run(
        [sys.executable, "-m", "inferd", "bench", server.url, "--model=nosuch", "--duration=0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot read the metadata of model 'nosuch'" in done.stderr


def test_a_server_with_an_api_token_is_benched_with_it_in_every_protocol(tmp_path: Path) -> None:
    # There was no way to send the token: the metadata read failed with 401, and with --payload
    # every request was refused.
    from tests.conftest import launch

    write_onnx_digits(tmp_path / "repo" / "digits" / "1")
    secured = launch(tmp_path, str(tmp_path / "repo"), "--api_token=sekret")
    try:
        status = f"{secured.url}/v1/models/digits"
        token = {"authorization": "Bearer sekret"}
        secured.wait_for(lambda: requests.get(status, headers=token, timeout=5).ok, "digits")
        for protocol in ("rest", "v2-binary", "grpc", "v2-grpc"):
            report = bench(
                target(secured, protocol),
                "--model=digits",
                f"--protocol={protocol}",
                "--api-token=sekret",
                "--concurrency=2",
                "--duration=0.3",
                "--warmup=0.1",
            )
            (step,) = report["steps"]  # type: ignore[misc]
            assert step["requests"] > 0, protocol
            assert step["errors"] == {}, protocol
            if not protocol.endswith("grpc"):  # the server's /metrics, read with the token too
                assert step["server_cpu_s_per_1k_predictions"] is not None
        argv = [sys.executable, "-m", "inferd", "bench", secured.url, "--model=digits", "--duration=0.3"]
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2
        assert "401" in refused.stderr
    finally:
        secured.stop()
