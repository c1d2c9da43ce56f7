"""TorchServe: a custom handler running onnxruntime, packed with torch-model-archiver, default
settings (``--disable-token-auth``); the batching variant sets ``batchSize``/``maxBatchDelay`` in
the archive's model-config.yaml."""

from __future__ import annotations

import shutil
import subprocess

from tests.inferd_process import free_port

from . import BATCH_WAIT_MS, MAX_BATCH, Context, Launch, Server, write

HANDLER = """
import json
import os

import numpy as np
import onnxruntime as ort

_session = None


def handle(data, context):
    global _session
    if _session is None:
        path = os.path.join(context.system_properties["model_dir"], "model.onnx")
        _session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    if data is None:
        return None
    arrays = []
    for row in data:
        body = row.get("data") or row.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        arrays.append(np.asarray(body["instances"], dtype=np.float32))
    y = _session.run(None, {_session.get_inputs()[0].name: np.concatenate(arrays)})[0]
    out, start = [], 0
    for a in arrays:
        out.append({"predictions": y[start:start + len(a)].tolist()})
        start += len(a)
    return out
"""


class TorchServeServer(Server):
    name = "torchserve"
    packages = ("torch==2.13.0", "torchserve", "torch-model-archiver", "pyyaml", "onnxruntime", "numpy")
    variants = ("default", "batching")
    report_packages = ("torchserve", "torch-model-archiver", "torch", "onnxruntime", "numpy")

    def launch(self, ctx: Context, port: int) -> Launch:

        store = ctx.work / "model_store"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        handler = write(ctx.work / "handler.py", HANDLER)
        shutil.copy(ctx.model_file, ctx.work / "model.onnx")
        archive = [
            str(ctx.venv / "bin" / "torch-model-archiver"),
            "--model-name",
            ctx.model,
            "--version",
            "1.0",
            "--serialized-file",
            str(ctx.work / "model.onnx"),
            "--handler",
            str(handler),
            "--export-path",
            str(store),
            "--force",
        ]
        if ctx.variant == "batching":
            cfg = write(
                ctx.work / "model-config.yaml", f"batchSize: {MAX_BATCH}\nmaxBatchDelay: {BATCH_WAIT_MS}\n"
            )
            archive += ["--config-file", str(cfg)]
        subprocess.run(archive, check=True, capture_output=True, cwd=ctx.work)
        write(
            ctx.work / "config.properties",
            f"inference_address=http://127.0.0.1:{port}\n"
            f"management_address=http://127.0.0.1:{free_port()}\n"
            f"metrics_address=http://127.0.0.1:{free_port()}\n",
        )
        env = {
            "PATH": f"{ctx.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "LOG_LOCATION": str(ctx.work / "logs"),
            "METRICS_LOCATION": str(ctx.work / "logs"),
        }
        return Launch(
            cmd=[
                str(ctx.venv / "bin" / "torchserve"),
                "--start",
                "--foreground",
                "--ncs",
                "--disable-token-auth",
                "--model-store",
                str(store),
                "--models",
                f"{ctx.model}={ctx.model}.mar",
                "--ts-config",
                str(ctx.work / "config.properties"),
            ],
            cwd=ctx.work,
            url=f"http://127.0.0.1:{port}/predictions/{ctx.model}",
            env=env,
            startup_timeout=180,
        )


SERVER = TorchServeServer()
