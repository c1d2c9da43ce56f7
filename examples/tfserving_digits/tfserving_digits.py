"""TensorFlow Serving's "Train and serve a TensorFlow model" tutorial, served by inferd.

The tutorial's steps, in its order: train a Keras classifier, evaluate it, export it as a
SavedModel into ``MODEL_DIR/1``, start the model server with the tutorial's flags, send its JSON
request for three test images, and plot them with the predicted and true labels.

One change: the tutorial trains on Fashion-MNIST, which this machine cannot download, so the
images are scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, 10 classes),
kept at 8x8 and scaled to [0, 1]. The model is the tutorial's: ``Flatten`` then
``Dense(10, activation='softmax', name='Softmax')``.

Run, from the checkout (``bash scripts/setup tutorial`` installs inferd with TensorFlow,
matplotlib and requests into ``.venv/``)::

    .venv/bin/python examples/tfserving_digits/tfserving_digits.py --out /tmp/digits

It writes ``MODEL_DIR`` (``--out``/models), ``predictions.png`` and ``results.json`` (served and
in-process predictions) under ``--out``.

The export is the one step that depends on the Keras version (see docs/tfserving-tutorial.md):
the tutorial's ``model.save(export_path, save_format="tf")`` is Keras 2's (TensorFlow up to
2.15, or ``tf_keras``); Keras 3 (TensorFlow 2.16 on) refuses ``save_format`` and writes a
SavedModel with ``model.export(export_path)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import matplotlib
import numpy as np
import requests
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the file-only backend

CLASS_NAMES = [str(digit) for digit in range(10)]


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test images (8x8, float32 in [0, 1]) and labels, 75/25, stratified."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    return train_x, train_y, test_x, test_y


def train(train_x: np.ndarray, train_y: np.ndarray, epochs: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8), name="images"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax", name="Softmax"),
        ]
    )
    model.summary()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_x, train_y, epochs=epochs, verbose=2)
    return model


def export_saved_model(model: keras.Model, export_path: Path) -> None:
    """Write ``model`` as a SavedModel with a ``serving_default`` signature into ``export_path``,
    the way this Keras version does it."""
    if int(keras.__version__.split(".")[0]) >= 3:
        print(f"Keras {keras.__version__}: model.export(export_path)")
        model.export(str(export_path))
    else:  # the tutorial's own call, for Keras 2
        print(f"Keras {keras.__version__}: model.save(export_path, save_format='tf')")
        model.save(str(export_path), save_format="tf")


def serve(model_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """Start ``inferd serve`` with the tutorial's flags and wait until the model answers."""
    command = [
        sys.executable,
        "-m",
        "inferd",
        "serve",
        f"--rest_api_port={port}",
        "--model_name=digits_model",
        f"--model_base_path={model_dir}",
        "--host=127.0.0.1",
        "--port=0",
    ]
    print("$", " ".join(["inferd", *command[3:]]))
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"inferd exited with {server.returncode}")
        try:
            status = requests.get(f"http://localhost:{port}/v1/models/digits_model", timeout=1)
            if status.ok and status.json()["model_version_status"][0]["state"] == "AVAILABLE":
                print(json.dumps(status.json(), indent=2))
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("inferd did not serve digits_model within 120 s")


def show(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, path: Path) -> None:
    """The tutorial's plot: each image titled with the predicted and true class, green when
    right and red when wrong."""
    figure, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.5))
    for ax, image, label, prediction in zip(axes, images, labels, predictions, strict=True):
        guess = int(np.argmax(prediction))
        ax.imshow(image, cmap="gray_r")
        ax.axis("off")
        ax.set_title(
            f"The model thought this was a {CLASS_NAMES[guess]} (class {guess}),\n"
            f"and it was actually a {CLASS_NAMES[label]} (class {label})",
            color="green" if guess == label else "red",
            fontsize=9,
        )
    figure.tight_layout()
    figure.savefig(path)
    print(f"saved the plot to {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tfserving_digits_out"), help="output folder")
    parser.add_argument("--port", type=int, default=8501, help="REST port for inferd (the tutorial's 8501)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    train_x, train_y, test_x, test_y = load_data()
    print(f"train_images.shape: {train_x.shape}, of {train_x.dtype}")
    print(f"test_images.shape: {test_x.shape}, of {test_x.dtype}")
    model = train(train_x, train_y, args.epochs)
    test_loss, test_acc = model.evaluate(test_x, test_y, verbose=0)
    print(f"\nTest accuracy: {test_acc}\nTest loss: {test_loss}")

    model_dir = (args.out / "models" / "digits_model").resolve()
    export_path = model_dir / "1"
    print(f"export_path = {export_path}")
    export_saved_model(model, export_path)

    server = serve(model_dir, args.port)
    try:
        data = json.dumps({"signature_name": "serving_default", "instances": test_x[0:3].tolist()})
        print(f"Data: {{ ... {data[-60:]}")
        headers = {"content-type": "application/json"}
        json_response = requests.post(
            f"http://localhost:{args.port}/v1/models/digits_model:predict", data=data, headers=headers
        )
        predictions = np.array(json.loads(json_response.text)["predictions"])
    finally:
        server.terminate()
        server.wait(timeout=30)

    show(test_x[0:3], test_y[0:3], predictions, args.out / "predictions.png")
    results = {
        "test_loss": float(test_loss),
        "test_accuracy": float(test_acc),
        "images": test_x[0:3].tolist(),
        "labels": test_y[0:3].tolist(),
        "served": predictions.tolist(),
        "in_process": model.predict(test_x[0:3], verbose=0).tolist(),
        "model_dir": str(model_dir),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
