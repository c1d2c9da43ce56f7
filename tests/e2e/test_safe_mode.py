"""``--safe`` against a real server: formats whose loading runs code from the repository (pickle
and joblib, custom ``model.py``, TensorFlow and torch programs, skops with types the repository
adds to its trust list) are refused with a load error naming the rule; ONNX and skops still
serve. The same repository without ``--safe`` serves the pickle and the custom model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import joblib
import pytest
import requests

from tests.conftest import ServerProcess, launch
from tests.models import (
    digits,
    digits_classifier,
    write_onnx_affine,
    write_python_model,
    write_sklearn_digits,
)

REFUSED = {
    "pickled": "--safe refuses model.joblib: pickle and joblib files run code",
    "custom": "--safe refuses the python runtime: model.py is Python code",
    "custom_in_worker": "--safe refuses the python runtime",
    "widened_skops": "--safe refuses [sklearn] trusted_types",
    "tensorflow": "--safe refuses the tensorflow runtime",
    "torch": "--safe refuses the torch runtime",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("safe")
    write_onnx_affine(repo / "onnx" / "1", scale=2.0)
    write_sklearn_digits(repo / "skops" / "1")
    (repo / "pickled" / "1").mkdir(parents=True)
    joblib.dump(digits_classifier(), repo / "pickled" / "1" / "model.joblib")
    body = "def load(self):\n    pass\n\ndef predict(self, inputs):\n    return {'y': inputs['x']}"
    write_python_model(repo / "custom" / "1", body)
    write_python_model(repo / "custom_in_worker" / "1", body)
    (repo / "custom_in_worker" / "inferd.toml").write_text('isolation = "process"\n')
    write_sklearn_digits(repo / "widened_skops" / "1")
    (repo / "widened_skops" / "inferd.toml").write_text('[sklearn]\ntrusted_types = ["builtins.eval"]\n')
    # The refusal comes before the framework is asked to read anything: empty files do.
    (repo / "tensorflow" / "1").mkdir(parents=True)
    (repo / "tensorflow" / "1" / "saved_model.pb").write_bytes(b"")
    (repo / "torch" / "1").mkdir(parents=True)
    (repo / "torch" / "1" / "model.pt").write_bytes(b"")
    return repo


@pytest.fixture(scope="module")
def safe_server(repo: Path) -> Iterator[ServerProcess]:
    process = launch(repo, str(repo), "--safe")
    yield process
    process.stop()


def status(server: ServerProcess, model: str) -> dict[str, object]:
    response = requests.get(f"{server.url}/v1/models/{model}", timeout=5)
    assert response.status_code == 200, response.text
    (version,) = response.json()["model_version_status"]
    return dict(version)


@pytest.mark.parametrize("model", sorted(REFUSED))
def test_safe_mode_refuses_formats_that_run_repository_code(safe_server: ServerProcess, model: str) -> None:
    version = status(safe_server, model)
    assert version["state"] == "END"
    assert isinstance(version["status"], dict)
    assert REFUSED[model] in version["status"]["error_message"]
    answer = requests.post(
        f"{safe_server.url}/v1/models/{model}:predict", json={"instances": [[0]]}, timeout=10
    )
    assert answer.status_code == 404


def test_safe_mode_still_serves_onnx_and_skops(safe_server: ServerProcess) -> None:
    onnx = requests.post(
        f"{safe_server.url}/v1/models/onnx:predict", json={"instances": [[1, 2, 3, 4]]}, timeout=10
    )
    assert onnx.json() == {"predictions": [[2.0, 4.0, 6.0, 8.0]]}
    x, _ = digits()
    skops = requests.post(
        f"{safe_server.url}/v1/models/skops:predict", json={"instances": x[:3].tolist()}, timeout=10
    )
    assert skops.status_code == 200
    assert skops.json()["predictions"] == digits_classifier().predict(x[:3]).tolist()  # type: ignore[attr-defined]


def test_without_safe_the_same_models_serve_pickle_and_custom_code(repo: Path, tmp_path: Path) -> None:
    for model in ("pickled", "custom", "custom_in_worker"):  # not tensorflow and torch: slow imports
        shutil.copytree(repo / model, tmp_path / "repo" / model)
    server = launch(tmp_path, str(tmp_path / "repo"))
    try:
        for model in ("pickled", "custom", "custom_in_worker"):
            assert status(server, model)["state"] == "AVAILABLE"
        custom = requests.post(
            f"{server.url}/v1/models/custom:predict", json={"instances": [[1, 2]]}, timeout=10
        )
        assert custom.json() == {"predictions": [[1.0, 2.0]]}
    finally:
        server.stop()
