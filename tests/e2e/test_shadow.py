"""Shadow traffic: a shadow that raises or sleeps changes nothing that clients get, and the
agreement metric of a shadow known to disagree on half the rows says so."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.conftest import ServerProcess
from tests.e2e.test_metrics import samples
from tests.models import write_onnx_affine, write_python_model

SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}]}'
)
RAISES = """
def load(self):
    pass

def predict(self, inputs):
    if inputs["x"].any():  # warm-up sends zeros
        raise RuntimeError("the shadow is broken")
    return {"y": inputs["x"]}
"""
SLEEPS = """
def load(self):
    pass

def predict(self, inputs):
    import time
    if inputs["x"].any():
        time.sleep(2)
    return {"y": inputs["x"]}
"""
NEGATES = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": -inputs["x"]}
"""


def write_settings(base: Path, shadow: str, extra: str = "") -> None:
    staging = base / "inferd.toml.new"
    staging.write_text(f'version_policy = {{ all = true }}\n[traffic]\n"1" = 1\n[shadow]\n{shadow}\n{extra}')
    staging.rename(base / "inferd.toml")


def shadow_samples(server: ServerProcess, name: str, **labels: str) -> float:
    wanted = {("model", "m"), *labels.items()}
    return sum(v for (n, ls), v in samples(server).items() if n == name and wanted <= ls)


def predict(server: ServerProcess, rows: list[list[float]]) -> requests.Response:
    return requests.post(f"{server.url}/v1/models/m:predict", json={"instances": rows}, timeout=30)


def test_a_shadow_that_raises_or_sleeps_changes_nothing_for_clients(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    write_onnx_affine(base / "1", scale=1.0)
    write_python_model(base / "2", RAISES, SIGNATURE)
    write_python_model(base / "3", SLEEPS, SIGNATURE)
    write_settings(base, "version = 2\nfraction = 1.0")
    server = start_server(f"--model_base_path={base}", "--model_name=m")
    rows = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]]
    for _ in range(30):
        answer = predict(server, rows)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"predictions": rows}
        assert answer.headers["x-inferd-model-version"] == "1"
    server.wait_for(
        lambda: (
            shadow_samples(server, "inferd_shadow_requests_total", primary="1", shadow="2", result="failed")
            + shadow_samples(
                server, "inferd_shadow_requests_total", primary="1", shadow="2", result="dropped"
            )
            == 30
        ),
        "every mirrored request to fail or be dropped",
    )
    assert shadow_samples(server, "inferd_shadow_requests_total", shadow="2", result="compared") == 0
    assert "shadow version 2 of model m failed" in server.log()

    write_settings(base, "version = 3\nfraction = 1.0\nqueue = 2")
    server.wait_for(
        lambda: (
            predict(server, rows).ok
            and shadow_samples(server, "inferd_shadow_requests_total", shadow="3") > 0
        ),
        "the shadow to move to version 3",
    )
    for _ in range(30):
        answer = predict(server, rows)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"predictions": rows}
    # The sleeping shadow cannot keep up: its queue of 2 overflows and mirrored requests drop.
    assert shadow_samples(server, "inferd_shadow_requests_total", shadow="3", result="dropped") > 0


def test_the_agreement_rate_of_a_shadow_that_disagrees_on_half_the_rows(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    write_onnx_affine(base / "1", scale=1.0)
    write_python_model(base / "2", NEGATES, SIGNATURE)
    write_settings(base, 'version = 2\nfraction = 1.0\ncompare = "argmax"')
    server = start_server(f"--model_base_path={base}", "--model_name=m")
    for _ in range(10):
        # argmax of x and of -x: both 0 on a constant row, 3 and 0 on an increasing one.
        assert predict(server, [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]]).ok
    server.wait_for(
        lambda: (
            shadow_samples(server, "inferd_shadow_requests_total", primary="1", shadow="2", result="compared")
            == 10
        ),
        "the ten mirrored requests to be compared",
    )
    assert shadow_samples(server, "inferd_shadow_rows_total", primary="1", shadow="2", agree="true") == 10
    assert shadow_samples(server, "inferd_shadow_rows_total", primary="1", shadow="2", agree="false") == 10
    assert shadow_samples(server, "inferd_shadow_agreement_ratio", primary="1", shadow="2") == 0.5
    # The largest difference per row: 2 on the constant rows, 8 on the increasing ones.
    assert shadow_samples(server, "inferd_shadow_difference_count", primary="1", shadow="2") == 20
    assert shadow_samples(server, "inferd_shadow_difference_sum", primary="1", shadow="2") == 10 * (2 + 8)


def negates_logging_rows(log: Path) -> str:
    """A shadow that answers -x, appends each call's row count to ``log`` (not the warm-up's zeros)
    and takes 50 ms."""
    return f"""
def load(self):
    pass

def predict(self, inputs):
    import time
    if inputs["x"].any():
        with open({str(log)!r}, "a") as f:
            f.write(str(len(inputs["x"])) + "\\n")
    time.sleep(0.05)
    return {{"y": -inputs["x"]}}
"""


def test_a_batching_shadow_gets_mirrored_requests_as_one_batch_and_compares_each_row(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "m"
    calls = tmp_path / "shadow-calls.txt"
    write_onnx_affine(base / "1", scale=1.0)
    write_python_model(base / "2", negates_logging_rows(calls), SIGNATURE)
    batching = "[batching]\nmax_batch_size = 64\nbatch_timeout_micros = 500\n"
    write_settings(base, 'version = 2\nfraction = 1.0\ncompare = "argmax"', batching)
    server = start_server(f"--model_base_path={base}", "--model_name=m")
    agree, disagree = [1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]
    # Requests of one and two rows: the shadow's answers must be split back by each one's rows.
    bodies = [[agree], [disagree, agree], [disagree]] * 10
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda rows: predict(server, rows), bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if not a.ok]
    server.wait_for(
        lambda: (
            shadow_samples(server, "inferd_shadow_requests_total", primary="1", shadow="2", result="compared")
            == 30
        ),
        "the thirty mirrored requests to be compared",
    )
    assert shadow_samples(server, "inferd_shadow_rows_total", primary="1", shadow="2", agree="true") == 20
    assert shadow_samples(server, "inferd_shadow_rows_total", primary="1", shadow="2", agree="false") == 20
    rows_per_call = [int(n) for n in calls.read_text().split()]
    assert sum(rows_per_call) == 40
    # 30 requests arrived while each call took 50 ms: the shadow took several in one call.
    assert len(rows_per_call) < 30, rows_per_call
    assert max(rows_per_call) > 2, rows_per_call


def test_a_slow_shadow_of_one_model_leaves_another_models_shadow_its_own_queue(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Each model's ``queue`` bounds its own mirrored requests: with one queue for every model,
    the slow model's backlog counted against the fast one's bound, whose requests were dropped."""
    for name, shadow in (("slow", SLEEPS), ("fast", NEGATES)):
        write_onnx_affine(tmp_path / name / "1", scale=1.0)
        write_python_model(tmp_path / name / "2", shadow, SIGNATURE)
        write_settings(tmp_path / name, "version = 2\nfraction = 1.0\nqueue = 2")
    server = start_server(str(tmp_path))
    rows = [[1.0, 2.0, 3.0, 4.0]]

    def mirrored(model: str, result: str) -> float:
        wanted = {("model", model), ("result", result)}
        return sum(
            v
            for (n, ls), v in samples(server).items()
            if n == "inferd_shadow_requests_total" and wanted <= ls
        )

    for _ in range(8):  # one sleeps on the shadow thread, two wait, the rest are dropped
        assert requests.post(f"{server.url}/v1/models/slow:predict", json={"instances": rows}, timeout=30).ok
    for _ in range(2):
        assert requests.post(f"{server.url}/v1/models/fast:predict", json={"instances": rows}, timeout=30).ok
    server.wait_for(
        lambda: mirrored("fast", "compared") == 2, "the fast model's shadow to compare both", timeout_s=20
    )
    assert mirrored("fast", "dropped") == 0
    assert mirrored("slow", "dropped") > 0
