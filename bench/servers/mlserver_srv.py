"""MLServer: a custom runtime class running onnxruntime, V2 protocol ``/v2/models/NAME/infer``;
default settings, and adaptive batching (``max_batch_size``/``max_batch_time``) for the
batching variant."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tests.inferd_process import free_port

from . import BATCH_WAIT_MS, MAX_BATCH, Context, Launch, Server, write

RUNTIME = """
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        self.session = ort.InferenceSession(self.settings.parameters.uri, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        y = self.session.run(None, {self.input_name: x})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("probabilities", y)])
"""


class MLServerServer(Server):
    name = "mlserver"
    # MLServer 1.7 workers call asyncio.get_event_loop() outside a loop, which uvloop >= 0.22 refuses
    packages = ("mlserver", "uvloop<0.22", "onnxruntime", "numpy")
    variants = ("default", "batching")
    report_packages = ("mlserver", "uvloop", "onnxruntime", "numpy", "fastapi", "uvicorn")

    def launch(self, ctx: Context, port: int) -> Launch:

        folder = ctx.work / "mlserver"
        write(folder / "runtime.py", RUNTIME)
        write(
            folder / "settings.json",
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "http_port": port,
                    "grpc_port": free_port(),
                    "metrics_port": free_port(),
                }
            ),
        )
        model_settings: dict[str, Any] = {
            "name": ctx.model,
            "implementation": "runtime.OnnxRuntime",
            "parameters": {"uri": str(ctx.model_file)},
        }
        if ctx.variant == "batching":
            model_settings |= {"max_batch_size": MAX_BATCH, "max_batch_time": BATCH_WAIT_MS / 1000}
        write(folder / "model-settings.json", json.dumps(model_settings))
        return Launch(
            cmd=[str(ctx.venv / "bin" / "mlserver"), "start", str(folder)],
            cwd=folder,
            url=f"http://127.0.0.1:{port}/v2/models/{ctx.model}/infer",
            startup_timeout=120,
        )

    def body(self, x: np.ndarray, variant: str) -> bytes:
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        return json.dumps({"inputs": [tensor]}).encode()

    def predictions(self, answer: bytes, headers: dict[str, str], variant: str) -> np.ndarray:
        out = json.loads(answer)["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


SERVER = MLServerServer()
