"""LitServe: a LitAPI running onnxruntime; ``max_batch_size``/``batch_timeout`` for the batching
variant (requests are batched; each may hold several examples, so batch/unbatch concatenate and
split)."""

from __future__ import annotations

from . import BATCH_WAIT_MS, MAX_BATCH, Context, Launch, Server, write

APP = """
import os
import sys

import litserve as ls
import numpy as np
import onnxruntime as ort


class OnnxAPI(ls.LitAPI):
    def setup(self, device):
        self.session = ort.InferenceSession(
            os.environ["BENCH_MODEL_FILE"], providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def decode_request(self, request):
        return np.asarray(request["instances"], dtype=np.float32)

    def batch(self, inputs):
        return inputs  # a list of [n_i, ...] arrays; predict concatenates

    def predict(self, x):
        if isinstance(x, list):
            sizes = np.cumsum([len(a) for a in x])[:-1]
            y = self.session.run(None, {self.input_name: np.concatenate(x)})[0]
            return np.split(y, sizes)
        return self.session.run(None, {self.input_name: x})[0]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"predictions": output.tolist()}


if __name__ == "__main__":
    port, batching = int(sys.argv[1]), sys.argv[2] == "1"
    kwargs = {"max_batch_size": int(sys.argv[3]), "batch_timeout": float(sys.argv[4])} if batching else {}
    server = ls.LitServer(OnnxAPI(**kwargs), accelerator="cpu")
    server.run(host="127.0.0.1", port=port, generate_client_file=False)
"""


class LitServeServer(Server):
    name = "litserve"
    packages = ("litserve", "onnxruntime", "numpy")
    variants = ("default", "batching")
    report_packages = ("litserve", "fastapi", "uvicorn", "onnxruntime", "numpy")

    def launch(self, ctx: Context, port: int) -> Launch:
        write(ctx.work / "server.py", APP)
        batching = "1" if ctx.variant == "batching" else "0"
        return Launch(
            cmd=[
                str(ctx.venv / "bin" / "python"),
                "server.py",
                str(port),
                batching,
                str(MAX_BATCH),
                str(BATCH_WAIT_MS / 1000),
            ],
            cwd=ctx.work,
            url=f"http://127.0.0.1:{port}/predict",
            env={"BENCH_MODEL_FILE": str(ctx.model_file)},
        )


SERVER = LitServeServer()
