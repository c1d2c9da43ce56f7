"""``inferd optimize`` end to end: three digits classifiers trained here (scikit-learn, Keras,
PyTorch) go through the real command; every variant it makes becomes a version of its model in
one repository, served by one real ``inferd serve``, and its answers over REST are compared with
the original version's on the 597 held-out digits.

Tolerances (docs/optimize.md states the same):
    onnx, onnx-optimized, onnx-mapped, tflite: probabilities within rtol 1e-5, atol 1e-6 of the
        original's.
    onnx-fp16: probabilities within atol 5e-3; accuracy within 1 point.
    int8 (onnx-int8-dynamic, onnx-int8-static, tflite-int8-dynamic, tflite-int8): accuracy at
        most 3 points below the original's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from inferd.optimize import VARIANT_NAMES, OptimizeOptions, run
from tests.conftest import ServerProcess, launch
from tests.models import digits, write_sklearn_digits, write_torchscript

TRAIN = slice(0, 1200)
HELD_OUT = slice(1200, None)

EXACT = {"rtol": 1e-5, "atol": 1e-6}
FP16_ATOL = 5e-3
FP16_ACCURACY_DROP = 0.01
INT8_ACCURACY_DROP = 0.03

ONNX_VARIANTS = [name for name in VARIANT_NAMES if name.startswith("onnx")]
TFLITE_VARIANTS = ["tflite", "tflite-int8-dynamic", "tflite-int8"]
VARIANTS = {
    "sklearn": ONNX_VARIANTS,
    "keras": ONNX_VARIANTS + TFLITE_VARIANTS,
    "torch": ONNX_VARIANTS,
    "logreg": ["onnx"],
    "torchscript": ["onnx"],
    "savedmodel": ["onnx", "tflite", "tflite-int8-dynamic"],
}
"""Model -> the variants made of it, which become versions 2, 3, ... (version 1 is the original)."""

pytestmark = pytest.mark.timeout(300)  # the module fixture trains three models and makes 26 variants

INPUT = {"sklearn": "inputs", "keras": "images", "torch": "x", "logreg": "inputs", "savedmodel": "images"}

TORCHSCRIPT_SIGNATURE = """
[signature]
inputs = [
  { name = "x", dtype = "float32", shape = [-1, 64] },
  { name = "weight", dtype = "float32", shape = [-1, 1] },
]
"""
"""TorchScript does not tell its inputs' shapes; exporting it needs them declared."""


def features(model: str, rows: slice) -> np.ndarray:
    """The digits as each model takes them: 64 raw pixels (scikit-learn), 8x8 scaled to [0, 1]
    (Keras), 64 scaled (PyTorch)."""
    x = digits()[0][rows]
    if model in ("keras", "savedmodel"):
        return (x / 16.0).reshape(-1, 8, 8)
    return x / 16.0 if model == "torch" else x


def write_sklearn_mlp(version_dir: Path) -> None:
    """Saved with joblib: skops would need its optimizer's type listed in ``[sklearn]``
    ``trusted_types``, and a model's ``inferd.toml`` options hold for all its versions, which the
    onnx runtime of the variants would refuse."""
    import joblib
    from sklearn.neural_network import MLPClassifier

    x, y = digits()
    version_dir.mkdir(parents=True)
    mlp = MLPClassifier((32,), max_iter=300, random_state=0).fit(x[TRAIN], y[TRAIN])
    joblib.dump(mlp, version_dir / "model.joblib")


def write_keras_mlp(version_dir: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8), name="images"),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(features("keras", TRAIN), digits()[1][TRAIN], epochs=30, batch_size=64, verbose=0)
    version_dir.mkdir(parents=True)
    model.save(version_dir / "model.keras")


def write_saved_model(keras_file: Path, version_dir: Path) -> None:
    """The Keras network exported as a SavedModel (``serving_default``: ``images`` -> ``output_0``)."""
    import keras

    keras.saving.load_model(keras_file).export(str(version_dir), verbose=False)


def write_torch_mlp(version_dir: Path) -> None:
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10), torch.nn.Softmax(dim=1)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    model = Classifier()
    x = torch.from_numpy(features("torch", TRAIN).astype(np.float32))
    y = torch.from_numpy(digits()[1][TRAIN])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.nll_loss(torch.log(model(x) + 1e-9), y).backward()
        optimizer.step()
    model.eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x[:2],), dynamic_shapes={"x": {0: batch}})
    version_dir.mkdir(parents=True)
    torch.export.save(program, str(version_dir / "model.pt2"))


def optimize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferd", "optimize", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Originals under ``originals/``, their variants under ``variants/<model>/``, and the
    command's results."""
    root = tmp_path_factory.mktemp("optimize")
    originals, out = root / "originals", root / "variants"
    write_sklearn_mlp(originals / "sklearn" / "1")
    write_keras_mlp(originals / "keras" / "1")
    write_saved_model(originals / "keras" / "1" / "model.keras", originals / "savedmodel" / "1")
    write_torch_mlp(originals / "torch" / "1")
    write_sklearn_digits(originals / "logreg" / "1")
    write_torchscript(originals / "torchscript" / "1")  # two inputs, two outputs
    (originals / "torchscript" / "inferd.toml").write_text(TORCHSCRIPT_SIGNATURE)
    for model in ("sklearn", "keras", "torch"):
        np.save(root / f"{model}-calibration.npy", features(model, slice(0, 500)).astype(np.float32))
    # In-process for the three frameworks (their imports are paid once, here); through the
    # command for the linear model and the exit statuses.
    outcomes = {}
    for model in ("sklearn", "keras", "torch"):
        options = OptimizeOptions(
            model=originals / "keras" / "1" if model == "keras" else originals / model,  # both forms
            out=out / model,
            calibration=str(root / f"{model}-calibration.npy"),
            tflite=model == "keras",
        )
        outcomes[model] = run(options)
    outcomes["savedmodel"] = run(
        OptimizeOptions(
            model=originals / "savedmodel",
            out=out / "savedmodel",
            only=("onnx", "tflite", "tflite-int8-dynamic"),
        )
    )
    outcomes["torchscript"] = run(
        OptimizeOptions(model=originals / "torchscript", out=out / "torchscript", only=("onnx",))
    )
    # A linear model: quantisation has nothing to work on, there is no TFLite converter for
    # scikit-learn, nor calibration rows for static quantisation; the ONNX conversion must still
    # be made.
    command = optimize(
        str(originals / "logreg"),
        "--out",
        str(out / "logreg"),
        "--only",
        "onnx,onnx-int8-dynamic,onnx-int8-static,tflite",
    )
    return {"root": root, "originals": originals, "out": out, "outcomes": outcomes, "command": command}


@pytest.fixture(scope="module")
def server(made: dict[str, Any]) -> Iterator[ServerProcess]:
    """One server over a repository in which version 1 of each model is the original and
    versions 2, 3, ... its variants, in ``VARIANTS`` order; ONNX versions keep their weights in
    onnxruntime's mapping of external data (``share_weights``), as the mapped variant is served."""
    repository = made["root"] / "repository"
    for model, variants in VARIANTS.items():
        shutil.copytree(made["originals"] / model, repository / model)
        for number, variant in enumerate(variants, start=2):
            shutil.copytree(made["out"] / model / variant, repository / model / str(number))
        settings = repository / model / "inferd.toml"
        previous = settings.read_text() if settings.exists() else ""
        shared = "[onnx]\nshare_weights = true\n" if "onnx-mapped" in variants else ""
        settings.write_text("version_policy = { all = true }\n" + previous + shared)
    server = launch(made["root"], str(repository))

    def settled() -> bool:
        return all(
            len(server.status(model)) == len(variants) + 1
            and set(server.status(model).values()) == {"AVAILABLE"}
            for model, variants in VARIANTS.items()
        )

    try:
        server.wait_for(settled, "every original and variant to load", timeout_s=120)
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


def predict(
    server: ServerProcess, model: str, version: int, output: str, signature: str = "serving_default"
) -> Any:
    """Output ``output`` of one version on the held-out digits, over TF Serving's REST API (which
    answers a one-output signature with the bare value)."""
    body = {"signature_name": signature, "inputs": {INPUT[model]: features(model, HELD_OUT).tolist()}}
    response = requests.post(
        f"{server.url}/v1/models/{model}/versions/{version}:predict", json=body, timeout=60
    )
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    return outputs[output] if isinstance(outputs, dict) else outputs


def probabilities(server: ServerProcess, model: str, version: int) -> np.ndarray:
    if model == "sklearn" and version == 1:  # the original's probabilities are its predict_proba
        return np.asarray(predict(server, model, 1, "probabilities", "predict_proba"))
    name = "probabilities" if model == "sklearn" else "output_0"
    return np.asarray(predict(server, model, version, name))


def accuracy(p: np.ndarray) -> float:
    return float(np.mean(p.argmax(axis=1) == digits()[1][HELD_OUT]))


@pytest.mark.parametrize("model", list(VARIANTS))
def test_every_variant_is_made_and_recorded(made: dict[str, Any], model: str) -> None:
    out = made["out"] / model
    zeros = model in ("logreg", "torchscript", "savedmodel")  # made without --calibration
    if model == "logreg":
        assert made["command"].returncode == 0, made["command"].stderr
    else:
        assert [(o.name, o.error) for o in made["outcomes"][model]] == [
            (name, None) for name in VARIANTS[model]
        ]
    listing = json.loads((out / "variants.json").read_text())
    assert [(v["name"], v["ok"]) for v in listing if v["ok"]] == [(name, True) for name in VARIANTS[model]]
    for variant in VARIANTS[model]:
        record = json.loads((out / variant / "variant.json").read_text())
        assert record["name"] == variant
        assert Path(record["source"]) == made["originals"] / model / "1"
        assert record["method"]
        assert record["parameters"]
        assert datetime.fromisoformat(record["created"]).utcoffset() is not None
        model_files = [p for p in (out / variant).iterdir() if p.name != "variant.json"]
        assert record["size_bytes"] == sum(p.stat().st_size for p in model_files) > 0
        assert {"onnx", "onnxruntime"} <= set(record["tool_versions"]) or "keras" in record["tool_versions"]
        # The rows compared are the calibration rows, when given.
        assert record["check"]["inputs"] == ("zeros" if zeros else "calibration")


def test_a_failing_variant_is_reported_and_the_others_made(made: dict[str, Any]) -> None:
    run, out = made["command"], made["out"] / "logreg"
    listing = {v["name"]: v for v in json.loads((out / "variants.json").read_text())}
    assert list(listing) == ["onnx", "onnx-int8-dynamic", "onnx-int8-static", "tflite"]
    failures = {
        "onnx-int8-dynamic": "int8 quantisation changed no operator of this model",
        "onnx-int8-static": "needs calibration rows: give --calibration FILE",
        "tflite": "TFLite conversion needs a Keras or TensorFlow model; this is a sklearn model",
    }
    for name, reason in failures.items():
        assert not listing[name]["ok"]
        assert reason in listing[name]["error"]
        assert f"{name}: FAILED: {listing[name]['error']}" in run.stdout
        assert not (out / name).exists()
    assert listing["onnx"] == {"name": "onnx", "path": "onnx", "ok": True, "error": None}
    assert f"onnx: {out / 'onnx'}\n" in run.stdout
    assert "1 of 4 variants made" in run.stdout


def test_no_variant_made_exits_1_and_bad_options_exit_2(made: dict[str, Any]) -> None:
    out = made["root"] / "none"
    run = optimize(str(made["originals"] / "logreg"), "--out", str(out), "--only", "tflite-int8-dynamic")
    assert run.returncode == 1, run.stdout + run.stderr
    (entry,) = json.loads((out / "variants.json").read_text())
    assert entry["name"] == "tflite-int8-dynamic"
    assert entry["ok"] is False
    run = optimize(str(made["originals"] / "logreg"), "--out", str(out), "--only", "onnx,tiny")
    assert run.returncode == 2
    assert "--only: unknown variant(s) ['tiny']" in run.stderr
    np.save(made["root"] / "narrow.npy", np.zeros((5, 3), np.float32))
    run = optimize(
        str(made["originals"] / "logreg"),
        "--out",
        str(out),
        "--calibration",
        str(made["root"] / "narrow.npy"),
    )
    assert run.returncode == 2
    assert "--calibration " in run.stderr
    assert "narrow.npy: input 'inputs': expected FP64 [-1, 64], got FP32 [5, 3]" in run.stderr


def test_a_torchscript_program_converts_with_its_two_inputs_and_outputs(server: ServerProcess) -> None:
    x = features("torch", slice(0, 5))
    body = {"inputs": {"x": x.tolist(), "weight": [[0.5]] * 5}}
    answers = []
    for version in (1, 2):
        url = f"{server.url}/v1/models/torchscript/versions/{version}:predict"
        response = requests.post(url, json=body, timeout=60)
        assert response.status_code == 200, response.text
        answers.append(response.json()["outputs"])
    original, converted = answers
    assert set(converted) == {"output_0", "output_1"}
    for name in ("output_0", "output_1"):
        np.testing.assert_allclose(converted[name], original[name], **EXACT)


@pytest.mark.parametrize(
    ("model", "variant"),
    [(model, variant) for model, names in VARIANTS.items() if model != "torchscript" for variant in names],
)
def test_every_variant_serves_and_agrees_with_the_original(
    server: ServerProcess, model: str, variant: str
) -> None:
    version = VARIANTS[model].index(variant) + 2
    if model == "logreg":  # labels only: the conversion must give the same ones
        assert predict(server, model, version, "predictions") == predict(server, model, 1, "predictions")
        return
    expected, got = probabilities(server, model, 1), probabilities(server, model, version)
    assert got.shape == expected.shape == (597, 10)
    if variant in ("onnx", "onnx-optimized", "onnx-mapped", "tflite"):
        np.testing.assert_allclose(got, expected, **EXACT)
    elif variant == "onnx-fp16":
        np.testing.assert_allclose(got, expected, rtol=0, atol=FP16_ATOL)
        assert accuracy(got) >= accuracy(expected) - FP16_ACCURACY_DROP
    else:
        assert accuracy(got) >= accuracy(expected) - INT8_ACCURACY_DROP, (accuracy(got), accuracy(expected))


def test_the_mapped_variants_weights_are_served_from_the_file(
    server: ServerProcess, made: dict[str, Any]
) -> None:
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    for model in ("sklearn", "keras", "torch"):
        version = VARIANTS[model].index("onnx-mapped") + 2
        weights = made["root"] / "repository" / model / str(version) / "model.onnx.data"
        assert weights.stat().st_size > 8_000  # the first layer alone: 64 x 32 FP32
        assert str(weights.resolve()) in maps, model


@pytest.mark.parametrize("model", ["sklearn", "keras", "torch"])
def test_int8_and_fp16_variants_are_smaller(made: dict[str, Any], model: str) -> None:
    def size(variant: str) -> int:
        record = json.loads((made["out"] / model / variant / "variant.json").read_text())
        return int(record["size_bytes"])

    for variant in ("onnx-int8-dynamic", "onnx-int8-static", "onnx-fp16"):
        assert size(variant) < size("onnx"), variant
    if model == "keras":
        assert size("tflite-int8-dynamic") < size("tflite")
        assert size("tflite-int8") < size("tflite")


NATIVE_LOG_MARKS = ("I0000", "W0000", "absl::InitializeLog", "oneDNN", "XNNPACK", "cpu_feature_guard")


def test_variants_that_do_not_compute_the_model_fail_and_tensorflow_stays_quiet(tmp_path: Path) -> None:
    """A Keras network written with ``tf.saved_model.save`` (a way docs/runtimes.md gives):
    TFLite's conversion of that SavedModel answers NaN (in other TensorFlow builds, values near
    1e36) where the original answers probabilities. Those variants fail their check, with the
    reason; the ONNX one is made. TensorFlow's C++ log lines stay off the terminal."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    network = keras.Sequential(
        [
            keras.Input((8, 8), name="images"),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    tf.saved_model.save(network, str(tmp_path / "model" / "1"))
    np.save(tmp_path / "rows.npy", features("keras", slice(0, 100)).astype(np.float32))
    out = tmp_path / "variants"
    done = optimize(
        str(tmp_path / "model"),
        "--out",
        str(out),
        "--only",
        "onnx,tflite,tflite-int8-dynamic",
        "--calibration",
        str(tmp_path / "rows.npy"),
    )
    assert done.returncode == 0, done.stderr
    listing = {entry["name"]: entry for entry in json.loads((out / "variants.json").read_text())}
    assert listing["onnx"]["ok"], listing
    for name in ("tflite", "tflite-int8-dynamic"):
        assert not listing[name]["ok"], listing
        assert "output 'output_0' " in listing[name]["error"]
        assert "the variant does not compute the model" in listing[name]["error"]
        assert f"{name}: FAILED: output 'output_0' " in done.stdout
        assert not (out / name).exists()
    check = json.loads((out / "onnx" / "variant.json").read_text())["check"]
    assert check["outputs"]["output_0"]["max_abs_diff"] < 1e-5
    leaked = [line for line in done.stderr.splitlines() if any(mark in line for mark in NATIVE_LOG_MARKS)]
    assert leaked == [], done.stderr
