"""``inferd bench`` on a model with a string input, in every protocol it speaks: the requests
are encoded and answered, each step is reported as it completes, the server's own error message
is shown, a run where every request failed exits non-zero, and the plot names each step."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ServerProcess, launch
from tests.models import write_python_model

PROTOCOLS = ["rest", "v2", "v2-binary", "grpc", "v2-grpc"]
TEXT_MODEL = """
def load(self):
    pass

def predict(self, inputs):
    texts = [t if isinstance(t, bytes) else str(t).encode() for t in inputs["text"].reshape(-1)]
    return {"length": np.array([len(t.decode("utf-8")) for t in texts], dtype=np.int32)}
"""
TEXT_SIGNATURE = (
    '{"inputs": [{"name": "text", "dtype": "string", "shape": [-1]}], '
    '"outputs": [{"name": "length", "dtype": "int32", "shape": [-1]}]}'
)
WRONG_SHAPE = "input 'text': expected BYTES [-1], got BYTES [2, 2]"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("bench-strings")
    write_python_model(root / "repo" / "text" / "1", TEXT_MODEL, TEXT_SIGNATURE)
    process = launch(root, str(root / "repo"))
    process.wait_for(lambda: process.status("text") == {"1": "AVAILABLE"}, "the model")
    yield process
    process.stop()


def bench(server: ServerProcess, protocol: str, *args: str) -> subprocess.CompletedProcess[str]:
    target = server.grpc_target if protocol.endswith("grpc") else server.url
    argv = [sys.executable, "-m", "inferd", "bench", target, "--model=text", f"--protocol={protocol}"]
    argv += ["--duration=0.3", "--warmup=0.1", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_string_inputs_are_sent_and_answered_with_progress_per_step(
    server: ServerProcess, protocol: str, tmp_path: Path
) -> None:
    generated = bench(server, protocol, "--concurrency=1,2", "--json=-")
    assert generated.returncode == 0, generated.stderr
    steps = json.loads(generated.stdout)["steps"]
    ok = "OK" if protocol.endswith("grpc") else "200"
    for step in steps:
        assert step["errors"] == {}
        assert step["all_statuses"].get(ok, 0) > 0
        assert step["error_messages"] == []
    assert "step 1/2 c=1: " in generated.stderr
    assert "step 2/2 c=2: " in generated.stderr
    assert "0 errors of " in generated.stderr

    np.save(tmp_path / "texts.npy", np.array(["héllo", "wörld", ""]))  # not ASCII, one empty
    given = bench(server, protocol, f"--payload={tmp_path / 'texts.npy'}", "--json=-")
    assert given.returncode == 0, given.stderr
    (step,) = json.loads(given.stdout)["steps"]
    assert step["errors"] == {}
    assert step["predictions_per_s"] == pytest.approx(3 * step["requests_per_s"])


def test_bytes_that_are_not_utf8_go_as_base64_in_tf_serving_json(
    server: ServerProcess, tmp_path: Path
) -> None:
    np.save(tmp_path / "raw.npy", np.array([b"\xff\xfe", b"ok"]))
    # The model decodes its input as UTF-8, so it refuses \xff: the server's words come back.
    done = bench(server, "rest", f"--payload={tmp_path / 'raw.npy'}")
    assert done.returncode == 1
    assert "can't decode byte 0xff" in done.stderr
    refused = bench(server, "v2", f"--payload={tmp_path / 'raw.npy'}")
    assert refused.returncode == 2
    assert "input 'text' holds bytes that are not UTF-8" in refused.stderr


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_run_where_every_request_failed_shows_the_server_message_and_exits_1(
    server: ServerProcess, protocol: str, tmp_path: Path
) -> None:
    np.save(tmp_path / "square.npy", np.array([["a", "b"], ["c", "d"]]))  # the model takes [-1]
    report = tmp_path / "report.json"
    done = bench(server, protocol, f"--payload={tmp_path / 'square.npy'}", f"--json={report}")
    assert done.returncode == 1, done.stderr
    status = "INVALID_ARGUMENT" if protocol.endswith("grpc") else "400"
    assert f"inferd bench: every request failed: {status}: {WRONG_SHAPE}" in done.stderr
    assert f"{status}: {WRONG_SHAPE}" in done.stdout  # under the table
    (step,) = json.loads(report.read_text())["steps"]
    assert step["error_messages"] == [f"{status}: {WRONG_SHAPE}"]


def test_each_step_is_reported_as_it_completes_and_the_plot_names_the_steps(
    server: ServerProcess, tmp_path: Path
) -> None:
    plot = tmp_path / "latency.svg"
    argv = [sys.executable, "-m", "inferd", "bench", server.url, "--model=text"]
    argv += ["--concurrency=1,2", "--rate=50", "--duration=1", "--warmup=0.2", f"--plot={plot}"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        assert first.startswith("inferd bench: 3 step(s) of 0.2 s warm-up and 1 s measured each")
        step = process.stderr.readline()
        assert step.startswith("step 1/3 c=1: ")
        assert process.poll() is None  # two more steps (2.4 s of load) to go
        rest = process.communicate(timeout=120)[1]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, rest
    assert "step 2/3 c=2: " in rest
    assert "step 3/3 rate=50/s: " in rest
    drawing = plot.read_text()
    for label in ("c=1", "c=2", "rate=50/s"):
        assert f"<!-- {label} -->" in drawing
