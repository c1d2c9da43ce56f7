"""The TF Serving tutorial example, run end to end as a user runs it: train, export, serve with
the tutorial's flags, request, plot; the served predictions must equal the model's own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "docs" / "tfserving-tutorial.md"


def tutorial_command() -> list[str]:
    """The command docs/tfserving-tutorial.md gives to run the example, as words."""
    (line,) = [
        line for line in TUTORIAL.read_text().splitlines() if line.startswith(".venv/bin/python examples/")
    ]
    return line.split()


def test_tutorial_example_serves_what_the_model_predicts(tmp_path: Path) -> None:
    import tensorflow as tf

    out = tmp_path / "out"
    python, example, *args = tutorial_command()
    assert python == ".venv/bin/python"
    assert args == ["--out", "/tmp/digits"]
    # The tutorial's command, run by this environment's Python, writing into the test's folder.
    run = subprocess.run(
        [sys.executable, example, "--out", str(out), f"--port={free_port()}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Test accuracy:" in run.stdout
    assert f"Keras {tf.keras.__version__}: model.export(export_path)" in run.stdout  # as the page says
    results = json.loads((out / "results.json").read_text())
    served = np.asarray(results["served"], dtype=np.float32)
    assert served.shape == (3, 10)
    # The same float32 numbers, up to the last bit or two of a differently fused graph.
    np.testing.assert_allclose(
        served, np.asarray(results["in_process"], dtype=np.float32), rtol=1e-6, atol=1e-7
    )
    signature = tf.saved_model.load(str(Path(results["model_dir"]) / "1")).signatures["serving_default"]
    images = tf.constant(np.asarray(results["images"], dtype=np.float32))
    direct = next(iter(signature(images).values())).numpy()
    np.testing.assert_allclose(served, direct, rtol=1e-6, atol=1e-7)
    assert results["test_accuracy"] > 0.5  # chance is 0.1; five epochs of this linear model reach ~0.77
    assert (out / "predictions.png").read_bytes().startswith(b"\x89PNG")
