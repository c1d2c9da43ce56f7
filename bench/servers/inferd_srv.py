"""inferd itself, from the project's venv: default settings, with ``[batching]`` in the model's
``inferd.toml``, and with its metrics off (``--enable_metrics=false``), to price them; and the
same server driven over its other wires: KServe V2 JSON, V2 binary tensors (unbatched and
batched) and TF Serving's gRPC ``Predict``."""

from __future__ import annotations

import shutil

import numpy as np

from bench.payloads import v1_answer, v1_body, v2_answer, v2_binary_body, v2_json_body
from tests.inferd_process import free_port, model_available

from . import BATCH_WAIT_MS, MAX_BATCH, Context, Launch, Server, Wire, write


class Inferd(Server):
    name = "inferd"
    variants = ("default", "batching", "nometrics", "v2-json", "v2-binary", "v2-binary-batching", "grpc")
    extra_variants = ("v2-json", "v2-binary", "v2-binary-batching", "grpc")
    uses_project_venv = True
    report_packages = ("inferd", "onnxruntime", "uvicorn", "orjson", "numpy")

    def wire(self, variant: str) -> Wire:
        return Wire.GRPC if variant == "grpc" else Wire.HTTP

    def launch(self, ctx: Context, port: int) -> Launch:
        repo = ctx.work / "models"
        shutil.rmtree(repo, ignore_errors=True)
        (repo / ctx.model / "1").mkdir(parents=True)
        shutil.copy(ctx.model_file, repo / ctx.model / "1" / "model.onnx")
        if ctx.variant.endswith("batching"):
            # The queue holds what the heaviest scenario keeps in flight (64 connections x 32 rows);
            # with the default 16 batches it would shed most of that load with 503s, by design.
            write(
                repo / ctx.model / "inferd.toml",
                f"[batching]\nmax_batch_size = {MAX_BATCH}\nbatch_timeout_micros = {BATCH_WAIT_MS * 1000}\n"
                f"max_enqueued_batches = {64 * 32 // MAX_BATCH}\n",
            )
        root = f"http://127.0.0.1:{port}"
        grpc_port = free_port()

        def not_ready() -> str | None:
            return None if model_available(root, ctx.model) else f"model {ctx.model} not AVAILABLE at {root}"

        v2 = ctx.variant.startswith("v2-")
        return Launch(
            cmd=[
                str(ctx.venv / "bin" / "inferd"),
                "serve",
                str(repo),
                f"--rest_api_port={port}",
                f"--port={grpc_port}",
                "--host=127.0.0.1",
                *(["--enable_metrics=false"] if ctx.variant == "nometrics" else []),
            ],
            cwd=ctx.work,
            url=f"{root}/v2/models/{ctx.model}/infer" if v2 else f"{root}/v1/models/{ctx.model}:predict",
            grpc_target=f"127.0.0.1:{grpc_port}",
            not_ready=not_ready,
            startup_timeout=60,
        )

    def _request(self, x: np.ndarray, variant: str) -> tuple[bytes, dict[str, str]]:
        if variant == "v2-json":
            return v2_json_body(x)
        if variant.startswith("v2-binary"):
            return v2_binary_body(x)
        return v1_body(x)

    def body(self, x: np.ndarray, variant: str) -> bytes:
        return self._request(x, variant)[0]

    def headers(self, x: np.ndarray, variant: str) -> dict[str, str]:
        return self._request(x, variant)[1]

    def predictions(self, answer: bytes, headers: dict[str, str], variant: str) -> np.ndarray:
        return v2_answer(headers, answer) if variant.startswith("v2-") else v1_answer(answer)


SERVER = Inferd()
