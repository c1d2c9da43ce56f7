"""inferd itself, from the project's venv: default settings, with ``[batching]`` in the model's
``inferd.toml``, and with its metrics off (``--enable_metrics=false``), to price them."""

from __future__ import annotations

import json
import shutil
import urllib.request

from . import BATCH_WAIT_MS, MAX_BATCH, Context, Launch, Server, write


class Inferd(Server):
    name = "inferd"
    variants = ("default", "batching", "nometrics")
    uses_project_venv = True
    report_packages = ["inferd", "onnxruntime", "uvicorn", "orjson", "numpy"]

    def launch(self, ctx: Context, port: int) -> Launch:
        repo = ctx.work / "models"
        shutil.rmtree(repo, ignore_errors=True)
        (repo / ctx.model / "1").mkdir(parents=True)
        shutil.copy(ctx.model_file, repo / ctx.model / "1" / "model.onnx")
        if ctx.variant == "batching":
            # The queue holds what the heaviest scenario keeps in flight (64 connections x 32 rows);
            # with the default 16 batches it would shed most of that load with 503s, by design.
            write(
                repo / ctx.model / "inferd.toml",
                f"[batching]\nmax_batch_size = {MAX_BATCH}\nbatch_timeout_micros = {BATCH_WAIT_MS * 1000}\n"
                f"max_enqueued_batches = {64 * 32 // MAX_BATCH}\n",
            )
        base = f"http://127.0.0.1:{port}/v1/models/{ctx.model}"

        def not_ready() -> str | None:
            try:
                with urllib.request.urlopen(base, timeout=5) as r:
                    status = json.loads(r.read())
            except Exception as exc:
                return f"GET {base}: {exc}"
            versions = status.get("model_version_status", [])
            if any(v.get("state") == "AVAILABLE" for v in versions):
                return None
            return "model not AVAILABLE: " + json.dumps(versions)

        return Launch(
            cmd=[
                str(ctx.venv / "bin" / "inferd"),
                "serve",
                str(repo),
                f"--rest_api_port={port}",
                "--host=127.0.0.1",
                *(["--enable_metrics=false"] if ctx.variant == "nometrics" else []),
            ],
            cwd=ctx.work,
            url=f"{base}:predict",
            not_ready=not_ready,
            startup_timeout=60,
        )


SERVER = Inferd()
