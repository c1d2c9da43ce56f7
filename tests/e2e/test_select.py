"""``inferd select`` end to end: real models built now, the real CLI, a real server for promotion.

The constructed case has a known answer: ``big`` (1-nearest-neighbour in ONNX, the most
accurate, 0.3 MB with its training rows) is over the size budget, ``slow`` (logistic regression
in a custom Python model that sleeps 150 ms per call, second most accurate) is over the latency
budget, and ``tiny`` (Gaussian naive Bayes in ONNX, the least accurate, a few kB) wins. Budgets
are set far from every measured value so that a loaded machine does not change the answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import requests

from tests.conftest import ServerProcess
from tests.models import (
    digits,
    digits_classifier,
    write_onnx_digits,
    write_python_model,
    write_sklearn_digits,
)

pytestmark = pytest.mark.timeout(120)

TRAIN = 1200
SIZE_BUDGET_MB = 0.2
P99_BUDGET_MS = 100.0
_SLEEPING_LOGREG = """
def load(self):
    from pathlib import Path
    folder = Path(__file__).parent
    self.mean, self.scale = np.load(folder / "scaler.npy")
    self.coef, self.intercept = np.load(folder / "coef.npy"), np.load(folder / "intercept.npy")

def predict(self, inputs):
    import time
    time.sleep(0.15)
    z = (inputs["x"] - self.mean) / self.scale
    return {"label": np.argmax(z @ self.coef.T + self.intercept, axis=1)}
"""
_SLEEPING_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 64]}], '
    '"outputs": [{"name": "label", "dtype": "int64", "shape": [-1]}]}'
)


def _select(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferd", "select", *map(str, args), "--log_level", "error"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


def _select_digits(built: dict[str, Path], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``inferd select ARGS`` on the digits validation set (labels in column ``digit``), optimizing
    accuracy unless ARGS say otherwise."""
    goal = () if "--optimize" in args else ("--optimize", "accuracy")
    return _select(*args, "--data", built["data"], "--label", "digit", *goal)


def _validation_csv(path: Path) -> Path:
    x, y = digits()
    lines = [",".join([*(f"f{i}" for i in range(64)), "digit"])]
    lines += [
        ",".join([*(f"{v:g}" for v in row), str(label)])
        for row, label in zip(x[TRAIN:], y[TRAIN:], strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _knn() -> object:
    from sklearn.neighbors import KNeighborsClassifier

    x, y = digits()
    return KNeighborsClassifier(n_neighbors=1).fit(x[:TRAIN].astype(np.float64), y[:TRAIN])


def _write_big(version_dir: Path) -> None:
    _write_onnx(version_dir, _knn())


def _write_slow(version_dir: Path) -> None:
    write_python_model(version_dir, _SLEEPING_LOGREG, _SLEEPING_SIGNATURE)
    scaler, logreg = digits_classifier().steps  # type: ignore[attr-defined]
    np.save(version_dir / "scaler.npy", np.stack([scaler[1].mean_, scaler[1].scale_]))
    np.save(version_dir / "coef.npy", logreg[1].coef_)
    np.save(version_dir / "intercept.npy", logreg[1].intercept_)


def _write_onnx(version_dir: Path, estimator: object) -> None:
    import onnx
    from skl2onnx import to_onnx

    version_dir.mkdir(parents=True)
    x, _ = digits()
    onnx.save(
        to_onnx(estimator, x[:1], options={"zipmap": False}, target_opset=17), version_dir / "model.onnx"
    )


def _gaussian_nb() -> object:
    from sklearn.naive_bayes import GaussianNB

    x, y = digits()
    return GaussianNB().fit(x[:TRAIN], y[:TRAIN])


def _variants(out: Path) -> Path:
    """A folder as ``inferd optimize --out`` writes it: ``tiny`` made, ``broken`` failed."""
    _write_onnx(out / "tiny", _gaussian_nb())
    (out / "tiny" / "variant.json").write_text(json.dumps({"name": "tiny", "method": "onnx"}))
    entries = [
        {"name": "tiny", "path": "tiny", "ok": True, "error": None},
        {"name": "broken", "path": "broken", "ok": False, "error": "no converter"},
    ]
    (out / "variants.json").write_text(json.dumps(entries))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("select")
    _write_big(root / "models" / "big" / "1")
    _write_slow(root / "slow")
    write_onnx_digits(root / "logreg")
    return {
        "logreg": root / "logreg",
        "data": _validation_csv(root / "validation.csv"),
        "big": root / "models" / "big",
        "slow": root / "slow",
        "variants": _variants(root / "variants"),
    }


def test_known_answer_the_third_wins(built: dict[str, Path], tmp_path: Path) -> None:
    report, markdown, plot = tmp_path / "report.json", tmp_path / "report.md", tmp_path / "plot.png"
    done = _select_digits(
        built,
        built["big"],
        built["slow"],
        built["variants"],
        "--require",
        f"size_mb<={SIZE_BUDGET_MB}",
        "--require",
        f"p99_ms<={P99_BUDGET_MS}",
        "--price-per-hour",
        "0.35",
        "--json",
        report,
        "--markdown",
        markdown,
        "--plot",
        plot,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_bytes())
    assert result["winner"] == "tiny"
    by_name = {c["name"]: c for c in result["candidates"]}
    assert list(by_name) == ["big", "slow", "tiny"]  # the failed variant is not a candidate
    big, slow, tiny = by_name["big"], by_name["slow"], by_name["tiny"]
    assert big["metrics"]["accuracy"] > slow["metrics"]["accuracy"] > tiny["metrics"]["accuracy"] > 0.5
    assert big["metrics"]["size_mb"] > SIZE_BUDGET_MB
    assert big["reasons"][0] == f"size_mb {big['metrics']['size_mb']:.4g} > {SIZE_BUDGET_MB:g}"
    assert slow["metrics"]["p99_ms"] >= 150
    assert slow["reasons"] == [f"p99_ms {slow['metrics']['p99_ms']:.4g} > {P99_BUDGET_MS:g}"]
    assert tiny["won"]
    assert tiny["reasons"] == []
    for candidate in by_name.values():
        figures = candidate["metrics"]
        assert figures["throughput_rps"] > 0
        assert figures["cpu_s_per_1000"] > 0
        assert figures["peak_memory_mb"] > 0
        assert figures["p50_ms"] <= figures["p99_ms"]
        assert figures["cost_per_million"] == pytest.approx(0.35 / 3600 / figures["throughput_rps"] * 1e6)
        assert candidate["details"]["rows"] == len(digits()[1]) - TRAIN
    x, y = digits()
    session = onnxruntime.InferenceSession(built["big"] / "1" / "model.onnx")
    expected = float(np.mean(session.run(["label"], {"X": x[TRAIN:]})[0] == y[TRAIN:]))
    assert big["metrics"]["accuracy"] == pytest.approx(expected)
    assert "Winner: **tiny**" in markdown.read_text()
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "winner: tiny" in done.stdout


def test_no_candidate_qualifies(built: dict[str, Path], tmp_path: Path) -> None:
    """Every reason is printed, also for a candidate that does not load."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not an ONNX model")
    done = _select_digits(
        built,
        built["variants"],
        tmp_path / "broken",
        "--require",
        "accuracy>=0.999",
        "--require",
        "size_mb<0.000001",
    )
    assert done.returncode == 3, done.stderr
    assert "no candidate meets every requirement" in done.stderr
    assert "tiny: accuracy 0." in done.stderr
    assert "< 0.999" in done.stderr
    assert "size_mb " in done.stderr
    assert ">= 1e-06" in done.stderr
    assert "broken: failed: " in done.stderr
    assert "Traceback" not in done.stderr


def test_custom_metric_function(built: dict[str, Path], tmp_path: Path) -> None:
    """A user's function in a file, lower-is-better: the number of wrong answers."""
    (tmp_path / "scoring.py").write_text(
        "import numpy as np\n\n"
        "def wrong(y_true, y_pred):\n"
        "    return float(np.sum(np.asarray(y_true) != np.asarray(y_pred)))\n"
    )
    report = tmp_path / "report.json"
    done = _select_digits(
        built,
        built["logreg"],
        built["variants"],
        "--optimize",
        f"{tmp_path / 'scoring.py'}:wrong",
        "--direction",
        "min",
        "--json",
        report,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_bytes())
    assert result["optimize"] == {
        "metric": "wrong",
        "spec": f"{tmp_path / 'scoring.py'}:wrong",
        "higher_is_better": False,
    }
    x, y = digits()
    session = onnxruntime.InferenceSession(built["logreg"] / "model.onnx")
    wrong = {
        "logreg": int(np.sum(session.run(["label"], {"X": x[TRAIN:]})[0] != y[TRAIN:])),
        "tiny": int(np.sum(_gaussian_nb().predict(x[TRAIN:]) != y[TRAIN:])),  # type: ignore[attr-defined]
    }
    assert {c["name"]: c["metrics"]["wrong"] for c in result["candidates"]} == wrong
    assert result["winner"] == "logreg"
    (tiny,) = [c for c in result["candidates"] if c["name"] == "tiny"]
    assert tiny["reasons"] == [f"wrong {wrong['tiny']} > winner's {wrong['logreg']}"]


@pytest.mark.parametrize(
    ("requirement", "message"),
    [
        ("p99_ms=5", "expected <metric><op><number>"),
        ("latency<=5", "unknown metric 'latency'"),
    ],
)
def test_bad_require_is_refused_before_measuring(
    built: dict[str, Path], requirement: str, message: str
) -> None:
    done = _select_digits(
        built,
        built["variants"],
        "--optimize",
        "f1",
        "--require",
        requirement,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def _promotion_setup(root: Path) -> tuple[Path, Path]:
    """Model ``digits`` with version 1 (logistic regression), latest 2 served, label ``stable``
    on 1; the candidate promoted is ``tiny`` (naive Bayes), whose answers differ."""
    base = root / "repo" / "digits"
    write_onnx_digits(base / "1")
    config = root / "models.config"
    config.write_text(
        "model_config_list {\n  config {\n"
        f'    name: "digits"\n    base_path: "{base}"\n'
        "    model_version_policy { latest { num_versions: 2 } }\n"
        '    version_labels { key: "stable" value: 1 }\n'
        "  }\n}\n"
    )
    return base, config


def _promote(base: Path, config: Path) -> tuple[str, ...]:
    return ("--promote", str(base), "--promote-label", "stable", "--model_config_file", str(config))


def test_promotion_dry_run_changes_nothing(built: dict[str, Path], tmp_path: Path) -> None:
    base, config = _promotion_setup(tmp_path)
    before = config.read_text()
    done = _select_digits(
        built,
        built["variants"],
        *_promote(base, config),
    )
    assert done.returncode == 0, done.stderr
    assert "dry run" in done.stdout
    assert f"rename {base}/.inferd-promote-2-" in done.stdout
    assert f"-> {base}/2" in done.stdout
    diff = [line for line in done.stdout.splitlines() if line.startswith(("-", "+"))]
    assert '-    version_labels { key: "stable" value: 1 }' in diff  # the file as written
    assert "+      value: 2" in diff  # as protobuf's text format writes it
    assert sorted(p.name for p in base.iterdir()) == ["1"]
    assert config.read_text() == before


def test_promotion_into_a_running_server_under_traffic(
    built: dict[str, Path], tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base, config = _promotion_setup(tmp_path)
    server = start_server(f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0.2")
    server.wait_for(lambda: server.status("digits") == {"1": "AVAILABLE"}, "version 1")
    x, _ = digits()
    body = {"instances": x[TRAIN : TRAIN + 4].tolist()}
    routes = [
        f"{server.url}/v1/models/digits:predict",
        f"{server.url}/v1/models/digits/labels/stable:predict",
    ]
    outcomes: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                for route in routes:
                    try:
                        outcomes.append(session.post(route, json=body, timeout=10).status_code)
                    except requests.RequestException:
                        outcomes.append(-1)
                stop.wait(0.02)  # steady traffic that leaves the measuring some CPU on a small box

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        done = _select_digits(
            built,
            built["variants"],
            *_promote(base, config),
            "--wait-url",
            server.url,
            "--apply",
        )
        assert done.returncode == 0, done.stderr
        assert f"promoted tiny to {base / '2'}" in done.stdout

        def label_moved() -> bool:
            answer = requests.get(f"{server.url}/v1/models/digits/labels/stable/metadata", timeout=5)
            return answer.ok and answer.json()["model_spec"]["version"] == "2"

        server.wait_for(label_moved, "label stable on version 2")
        sent = len(outcomes)
        server.wait_for(lambda: len(outcomes) > sent + 20, "traffic after the promotion")
    finally:
        stop.set()
        sender.join()
    assert set(outcomes) == {200}, {s: outcomes.count(s) for s in set(outcomes)}
    assert len(outcomes) > 40
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # the staging folder is gone
    assert (base / "2" / "model.onnx").is_file()
    assert (base / "2" / "variant.json").is_file()
    assert 'key: "stable"\n      value: 2' in config.read_text()
    predicted = requests.post(routes[1], json=body, timeout=5).json()["predictions"]
    assert [row["label"] for row in predicted] == _gaussian_nb().predict(x[TRAIN : TRAIN + 4]).tolist()  # type: ignore[attr-defined]


def test_url_measures_through_the_server(
    built: dict[str, Path], tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Candidates served by name: a repository whose model ``tiny`` is the candidate ``tiny``."""
    repo = tmp_path / "repo"
    _write_onnx(repo / "tiny" / "1", _gaussian_nb())
    server = start_server(str(repo))
    server.wait_for(lambda: server.status("tiny") == {"1": "AVAILABLE"}, "tiny to load")
    report = tmp_path / "report.json"
    done = _select_digits(
        built,
        repo / "tiny",
        "--url",
        server.url,
        "--require",
        "server_p99_ms<=5000",
        "--json",
        report,
    )
    assert done.returncode == 0, done.stderr
    (tiny,) = json.loads(report.read_bytes())["candidates"]
    assert tiny["won"]
    assert tiny["details"]["server_errors"] == {}
    figures = tiny["metrics"]
    assert 0 < figures["server_p50_ms"] <= figures["server_p99_ms"]
    assert figures["server_throughput_rps"] > 0
    assert "server_p99_ms" in done.stdout


def test_a_column_too_many_is_a_data_mistake_exit_2_then_dropped(
    built: dict[str, Path], tmp_path: Path
) -> None:
    """An id column makes 65 columns besides the label for a 64-input model: said once, before any
    candidate is measured, not as every candidate failing; ``--drop_columns`` leaves it out."""
    lines = built["data"].read_text().splitlines()
    with_id = tmp_path / "with-id.csv"
    with_id.write_text(
        "\n".join(["id," + lines[0], *(f"{i}," + line for i, line in enumerate(lines[1:]))]) + "\n"
    )
    args = (built["logreg"], built["variants"], "--label", "digit", "--optimize", "accuracy")
    done = _select(*args, "--data", with_id)
    assert done.returncode == 2, done.stderr
    assert f"--data {with_id} does not fit candidate logreg" in done.stderr
    assert "exactly 64 feature columns besides the id (found 65: id, f0, f1, ..., f62, f63)" in done.stderr
    assert "--drop_columns" in done.stderr
    assert "failed" not in done.stderr
    assert "Traceback" not in done.stderr

    done = _select(*args, "--data", with_id, "--drop_columns", "id")
    assert done.returncode == 0, done.stderr
    assert "winner: logreg" in done.stdout

    done = _select(*args, "--data", with_id, "--drop_columns", "ids")
    assert done.returncode == 2
    assert f"--drop_columns 'ids': {with_id} has no such column" in done.stderr
    assert "did you mean 'id'?" in done.stderr


def test_a_misspelled_label_is_refused_before_measuring(built: dict[str, Path]) -> None:
    done = _select(built["logreg"], "--data", built["data"], "--label", "digt", "--optimize", "accuracy")
    assert done.returncode == 2, done.stderr
    assert f"--label 'digt': {built['data']} has no such column" in done.stderr
    assert "did you mean 'digit'?" in done.stderr
    assert "failed" not in done.stderr


def test_a_promotion_that_changes_the_api_is_refused_unless_allowed(
    built: dict[str, Path], tmp_path: Path
) -> None:
    """The served version is a skops pipeline (``serving_default`` answers one output,
    ``predictions``; ``predict_proba`` and ``classify`` exist); the candidate is the same
    classifier exported to ONNX (``label`` and ``probabilities`` from one signature)."""
    base = tmp_path / "repo" / "digits"
    write_sklearn_digits(base / "1")
    promote = (built["logreg"], "--promote", base, "--apply")
    done = _select_digits(built, *promote)
    assert done.returncode == 2, done.stderr
    assert f"does not answer as {base / '1'} does" in done.stdout
    assert "signature 'predict_proba' is removed" in done.stdout
    assert "signature 'classify' is removed" in done.stdout
    assert "signature 'serving_default': input 'inputs' (FP64 [-1, 64]) is removed" in done.stdout
    assert "signature 'serving_default': input 'X' (FP32 [-1, 64]) is added" in done.stdout
    assert (
        "signature 'serving_default': :predict answers one output ('predictions': the bare values) -> "
        "2 outputs (['label', 'probabilities']: an object per row)"
    ) in done.stdout
    assert "pass --allow_api_change to promote anyway" in done.stderr
    assert sorted(p.name for p in base.iterdir()) == ["1"]

    done = _select_digits(built, *promote, "--allow_api_change")
    assert done.returncode == 0, done.stderr
    assert "signature 'predict_proba' is removed" in done.stdout  # shown either way
    assert f"promoted logreg to {base / '2'}" in done.stdout
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]

    # The same API (the ONNX export again, over the ONNX version now served) passes silently.
    done = _select_digits(built, *promote)
    assert done.returncode == 0, done.stderr
    assert "the API changes" not in done.stdout
    assert f"promoted logreg to {base / '3'}" in done.stdout


CANARY_TOKEN = "canary-secret"


def _canary(server: ServerProcess, *guards: str) -> tuple[str, ...]:
    flags = ("--canary", "--wait-url", server.url, f"--admin_token={CANARY_TOKEN}", "--steps=50,100")
    return (*flags, "--step_s=1", *(f"--guard={guard}" for guard in guards))


def _rollout_status(server: ServerProcess) -> dict[str, object]:
    answer = requests.post(
        f"{server.url}/v2/repository/models/digits/rollout/status",
        headers={"authorization": f"Bearer {CANARY_TOKEN}"},
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    state: dict[str, object] = answer.json()
    return state


def _stable(server: ServerProcess) -> str:
    answer = requests.get(f"{server.url}/v1/models/digits/labels/stable/metadata", timeout=5)
    assert answer.ok, answer.text
    return str(answer.json()["model_spec"]["version"])


def test_a_canary_promotion_moves_the_label_only_through_a_passed_rollout(
    built: dict[str, Path], tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base, config = _promotion_setup(tmp_path)
    server = start_server(
        f"--model_config_file={config}",
        "--model_config_file_poll_wait_seconds=0.2",
        f"--admin_token={CANARY_TOKEN}",
    )
    server.wait_for(lambda: server.status("digits") == {"1": "AVAILABLE"}, "version 1")
    refused = _select_digits(built, built["variants"], *_promote(base, config), "--canary", "--apply")
    assert refused.returncode == 2
    assert "--canary: the rollout runs on a server: give --wait_url URL" in refused.stderr

    dry = _select_digits(built, built["variants"], *_promote(base, config), *_canary(server))
    assert dry.returncode == 0, dry.stderr
    assert (
        "then a canary rollout of model digits from label 'stable' to version 2: steps 50,100%" in dry.stdout
    )
    assert sorted(p.name for p in base.iterdir()) == ["1"]

    done = _select_digits(
        built, built["variants"], *_promote(base, config), *_canary(server, "error_rate<=0.01"), "--apply"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "through a canary rollout: label 'stable' is on version 2" in done.stdout
    state = _rollout_status(server)
    assert (state["state"], state["baseline"], state["canary"]) == ("done", 1, 2)
    assert [e["event"] for e in state["history"]] == ["started", "step", "step", "moving the label", "done"]  # type: ignore[union-attr]
    assert _stable(server) == "2"
    assert 'key: "stable"\n      value: 2' in config.read_text()  # the file agrees with the server


def test_a_canary_promotion_that_breaches_its_guard_is_rolled_back_and_the_label_stays(
    built: dict[str, Path], tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base, config = _promotion_setup(tmp_path)
    server = start_server(
        f"--model_config_file={config}",
        "--model_config_file_poll_wait_seconds=0.2",
        f"--admin_token={CANARY_TOKEN}",
    )
    server.wait_for(lambda: server.status("digits") == {"1": "AVAILABLE"}, "version 1")
    x, _ = digits()
    stop = threading.Event()

    def traffic() -> None:  # unnamed requests: the split sends half of them to the canary
        with requests.Session() as session:
            while not stop.is_set():
                session.post(
                    f"{server.url}/v1/models/digits:predict", json={"instances": x[:2].tolist()}, timeout=10
                )
                stop.wait(0.01)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        # No request is answered in 0 ms: the canary's p99 breaches this guard in its first step.
        done = _select_digits(
            built, built["variants"], *_promote(base, config), *_canary(server, "p99_ms<=0"), "--apply"
        )
    finally:
        stop.set()
        sender.join()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "was rolled_back: p99_ms<=0: canary" in done.stderr
    assert "label 'stable' stays on version 1" in done.stderr
    state = _rollout_status(server)
    assert (state["state"], state["baseline"], state["canary"]) == ("rolled_back", 1, 2)
    assert _stable(server) == "1"
    assert 'key: "stable"\n      value: 1' in config.read_text()  # rewritten in text format, unmoved
    assert (base / "2" / "model.onnx").is_file()  # the version stays, for a later try
