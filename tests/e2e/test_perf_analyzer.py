"""Triton's perf_analyzer, a load generator nobody here wrote, against inferd over V2 HTTP, V2 gRPC
and TF Serving's gRPC API (``--service-kind=tfserving``).

perf_analyzer reads the model's metadata and configuration before it sends anything and stops
at the first failed request, so a run that ends with a request count is a conformance check.
The binary ships in tritonclient's wheel; it links libcudart (from the nvidia-cuda-runtime-cu12
wheel; no GPU is used) and libb64 (Debian's libb64-0d).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess, launch
from tests.models import write_onnx_digits

PERF_ANALYZER = Path(sys.executable).parent / "perf_analyzer"


def _environment() -> dict[str, str]:
    import nvidia.cuda_runtime

    libraries = str(Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib")
    return {**os.environ, "LD_LIBRARY_PATH": libraries}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("perf")
    write_onnx_digits(repo / "digits" / "1")
    process = launch(repo, str(repo))
    yield process
    process.stop()


def served_requests(server: ServerProcess, protocol: str) -> float:
    """inferd's own count of successful digits requests over ``protocol``."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    labels = rf'[^}}]*model="digits"[^}}]*protocol="{protocol}"[^}}]*status="OK"[^}}]*'
    return sum(float(value) for value in re.findall(rf"inferd_requests_total\{{{labels}\}} (\S+)", text))


@pytest.mark.parametrize(
    ("args", "protocol"),
    [
        (["-i", "http"], "v2_rest"),
        (["-i", "http", "--input-tensor-format=json", "--output-tensor-format=json"], "v2_rest"),
        (["-i", "grpc"], "v2_grpc"),
        (["-i", "grpc", "--service-kind=tfserving"], "tfserving_grpc"),
    ],
)
def test_perf_analyzer_runs_clean(server: ServerProcess, args: list[str], protocol: str) -> None:
    port = server.grpc_target.rsplit(":", 1)[1] if "grpc" in args else server.url.rsplit(":", 1)[1]
    before = served_requests(server, protocol)
    run = subprocess.run(
        [
            str(PERF_ANALYZER),
            "-m",
            "digits",
            "-u",
            f"127.0.0.1:{port}",
            *args,
            "--shape",
            "X:1,64",
            "--concurrency-range",
            "2",
            "--measurement-interval",
            "500",
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            "50",
            # a conformance run, not a measurement: any latency spread on a busy machine is fine
            "--stability-percentage",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    counts = [int(n) for n in re.findall(r"Request count: (\d+)", run.stdout)]
    assert counts, run.stdout
    assert min(counts) > 0, run.stdout
    served = served_requests(server, protocol) - before
    # perf_analyzer also sends warm-up and unmeasured requests, so inferd served at least as many
    assert served >= sum(counts), (served, counts)
