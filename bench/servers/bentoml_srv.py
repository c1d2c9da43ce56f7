"""BentoML: a ``@bentoml.service`` running onnxruntime, ``bentoml serve`` with default settings;
the batching variant marks the API ``batchable=True`` (adaptive batching along axis 0)."""

from __future__ import annotations

import json

import numpy as np

from . import MAX_BATCH, Context, Launch, Server, write

APP = """
import os

import bentoml
import numpy as np
import onnxruntime as ort

BATCHING = os.environ.get("BENCH_BATCHING") == "1"


@bentoml.service
class OnnxModel:
    def __init__(self) -> None:
        self.session = ort.InferenceSession(
            os.environ["BENCH_MODEL_FILE"], providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    if BATCHING:
        @bentoml.api(batchable=True, batch_dim=0, max_batch_size=int(os.environ["BENCH_MAX_BATCH"]),
                     max_latency_ms=10000)
        def predict(self, instances: np.ndarray) -> np.ndarray:
            return self.session.run(None, {self.input_name: instances.astype(np.float32)})[0]
    else:
        @bentoml.api
        def predict(self, instances: np.ndarray) -> np.ndarray:
            return self.session.run(None, {self.input_name: instances.astype(np.float32)})[0]
"""


class BentoMLServer(Server):
    name = "bentoml"
    packages = ("bentoml", "onnxruntime", "numpy")
    variants = ("default", "batching")
    report_packages = ("bentoml", "onnxruntime", "numpy")

    def launch(self, ctx: Context, port: int) -> Launch:
        write(ctx.work / "service.py", APP)
        return Launch(
            cmd=[
                str(ctx.venv / "bin" / "bentoml"),
                "serve",
                "service:OnnxModel",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=ctx.work,
            url=f"http://127.0.0.1:{port}/predict",
            env={
                "BENCH_MODEL_FILE": str(ctx.model_file),
                "BENCH_BATCHING": "1" if ctx.variant == "batching" else "0",
                "BENCH_MAX_BATCH": str(MAX_BATCH),  # examples, as inferd counts them
                "BENTOML_HOME": str(ctx.work / "bentoml_home"),
                "BENTOML_DO_NOT_TRACK": "True",
            },
        )

    def predictions(self, answer: bytes, headers: dict[str, str], variant: str) -> np.ndarray:
        return np.asarray(json.loads(answer), dtype=np.float32)


SERVER = BentoMLServer()
