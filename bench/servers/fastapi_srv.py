"""The endpoint users write by hand: FastAPI, a pydantic request model, onnxruntime, ``uvicorn
app:app`` with default settings (one process, a sync endpoint run in the threadpool)."""

from __future__ import annotations

from . import Context, Launch, Server, write

APP = """
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

session = ort.InferenceSession(os.environ["BENCH_MODEL_FILE"], providers=["CPUExecutionProvider"])
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


@app.post("/predict", response_model=PredictResponse)
def predict(request: PredictRequest) -> PredictResponse:
    x = np.asarray(request.instances, dtype=np.float32)
    y = session.run(None, {input_name: x})[0]
    return PredictResponse(predictions=y.tolist())
"""


class FastAPIServer(Server):
    name = "fastapi"
    packages = ["fastapi", "uvicorn", "onnxruntime", "numpy"]
    report_packages = ["fastapi", "uvicorn", "pydantic", "onnxruntime", "numpy"]

    def launch(self, ctx: Context, port: int) -> Launch:
        write(ctx.work / "app.py", APP)
        return Launch(
            cmd=[str(ctx.venv / "bin" / "uvicorn"), "app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ctx.work,
            url=f"http://127.0.0.1:{port}/predict",
            env={"BENCH_MODEL_FILE": str(ctx.model_file), "BENCH_MODEL": ctx.model},
        )


SERVER = FastAPIServer()
