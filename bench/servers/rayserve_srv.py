"""Ray Serve: one deployment running onnxruntime behind Serve's HTTP proxy, default settings;
the batching variant goes through ``@serve.batch``."""

from __future__ import annotations

from pathlib import Path

from . import BATCH_WAIT_MS, MAX_BATCH, Context, Launch, Server, write

APP = """
import os
import signal
import sys

import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from starlette.requests import Request

PORT, BATCHING = int(sys.argv[1]), sys.argv[2] == "1"
MAX_BATCH, WAIT_S = int(sys.argv[3]), float(sys.argv[4])


@serve.deployment
class OnnxModel:
    def __init__(self, path: str) -> None:
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)
    async def batched(self, xs: list) -> list:
        sizes = np.cumsum([len(x) for x in xs])[:-1]
        y = self.session.run(None, {self.input_name: np.concatenate(xs)})[0]
        return np.split(y, sizes)

    async def __call__(self, request: Request) -> dict:
        x = np.asarray((await request.json())["instances"], dtype=np.float32)
        if BATCHING:
            y = await self.batched(x)
        else:
            y = self.session.run(None, {self.input_name: x})[0]
        return {"predictions": y.tolist()}


ray.init(include_dashboard=False, _temp_dir=os.environ["BENCH_RAY_TMP"])
serve.start(http_options={"host": "127.0.0.1", "port": PORT})
serve.run(OnnxModel.bind(os.environ["BENCH_MODEL_FILE"]), route_prefix="/")
print("ray serve ready", flush=True)
signal.pause()  # serve until the bench stops this process group
"""


class RayServeServer(Server):
    name = "rayserve"
    packages = ("ray[serve]", "onnxruntime", "numpy")
    variants = ("default", "batching")
    report_packages = ("ray", "onnxruntime", "numpy", "fastapi", "uvicorn")

    def launch(self, ctx: Context, port: int) -> Launch:
        write(ctx.work / "serve_app.py", APP)
        tmp = Path("/tmp") / f"rb-{port}"  # Ray's unix socket paths must stay short
        tmp.mkdir(parents=True, exist_ok=True)
        batching = "1" if ctx.variant == "batching" else "0"
        return Launch(
            cmd=[
                str(ctx.venv / "bin" / "python"),
                "serve_app.py",
                str(port),
                batching,
                str(MAX_BATCH),
                str(BATCH_WAIT_MS / 1000),
            ],
            cwd=ctx.work,
            url=f"http://127.0.0.1:{port}/",
            env={
                "BENCH_MODEL_FILE": str(ctx.model_file),
                "BENCH_RAY_TMP": str(tmp),
                "RAY_USAGE_STATS_ENABLED": "0",
            },
            startup_timeout=180,
            cleanup=[tmp],
        )


SERVER = RayServeServer()
