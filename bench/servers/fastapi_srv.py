"""The endpoint users write by hand: FastAPI, onnxruntime with one intra-op thread (the fair peer
of inferd's and the floors' single-threaded sessions), ``uvicorn app:app`` with default settings
(one process, a sync endpoint run in the threadpool). Two variants: ``typed``, a pydantic request
and response model, and ``untyped``, the body taken as a plain ``dict`` and a dict returned."""

from __future__ import annotations

from . import Context, Launch, Server, write

APP = """
import os
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import Body, FastAPI
from pydantic import BaseModel

options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(
    os.environ["BENCH_MODEL_FILE"], options, providers=["CPUExecutionProvider"]
)
input_name = session.get_inputs()[0].name

if os.environ["BENCH_MODEL"] == "cnn":
    class PredictRequest(BaseModel):
        instances: list[list[list[list[float]]]]
else:
    class PredictRequest(BaseModel):
        instances: list[list[float]]


class PredictResponse(BaseModel):
    predictions: list[list[float]]


app = FastAPI()

if os.environ["BENCH_VARIANT"] == "typed":
    @app.post("/predict", response_model=PredictResponse)
    def predict(request: PredictRequest) -> PredictResponse:
        x = np.asarray(request.instances, dtype=np.float32)
        y = session.run(None, {input_name: x})[0]
        return PredictResponse(predictions=y.tolist())
else:
    @app.post("/predict")
    def predict(body: dict[str, Any] = Body()) -> dict[str, Any]:
        x = np.asarray(body["instances"], dtype=np.float32)
        y = session.run(None, {input_name: x})[0]
        return {"predictions": y.tolist()}
"""


class FastAPIServer(Server):
    name = "fastapi"
    packages = ("fastapi", "uvicorn", "onnxruntime", "numpy")
    variants = ("typed", "untyped")
    report_packages = ("fastapi", "uvicorn", "pydantic", "onnxruntime", "numpy")

    def launch(self, ctx: Context, port: int) -> Launch:
        write(ctx.work / "app.py", APP)
        return Launch(
            cmd=[str(ctx.venv / "bin" / "uvicorn"), "app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ctx.work,
            url=f"http://127.0.0.1:{port}/predict",
            env={
                "BENCH_MODEL_FILE": str(ctx.model_file),
                "BENCH_MODEL": ctx.model,
                "BENCH_VARIANT": ctx.variant,
            },
        )


SERVER = FastAPIServer()
