"""A second floor: the same bare work as ``asgi_floor_srv`` (orjson -> numpy -> onnxruntime with one
thread -> orjson, inline, nothing else) behind granian's RSGI interface (its Rust HTTP server
calling the app without ASGI's message dictionaries), one worker, uvloop, no access log.

granian goes into its own venv like the alternatives, so that the project's dependencies stay
as they are; onnxruntime, numpy, orjson and uvloop there are pinned to the project venv's versions
so that both floors run the same model code."""

from __future__ import annotations

from importlib import metadata

from . import Context, Launch, Server, write

APP = """
import os

import numpy as np
import onnxruntime as ort
import orjson

options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(
    os.environ["BENCH_MODEL_FILE"], options, providers=["CPUExecutionProvider"]
)
input_name = session.get_inputs()[0].name
HEADERS = [("content-type", "application/json")]


async def app(scope, protocol):
    if scope.proto != "http":
        return
    x = np.asarray(orjson.loads(await protocol())["instances"], dtype=np.float32)
    y = session.run(None, {input_name: x})[0]
    protocol.response_bytes(
        200, HEADERS, orjson.dumps({"predictions": y}, option=orjson.OPT_SERIALIZE_NUMPY)
    )
"""


def _pinned(name: str) -> str:
    """``name==<the project venv's version>``, or plain ``name`` where it is not installed."""
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


class GranianFloor(Server):
    name = "granian-floor"
    packages = ("granian", *(_pinned(p) for p in ("onnxruntime", "numpy", "orjson", "uvloop")))
    report_packages = ("granian", "uvloop", "orjson", "onnxruntime", "numpy")

    def launch(self, ctx: Context, port: int) -> Launch:
        write(ctx.work / "floor.py", APP)
        return Launch(
            cmd=[
                str(ctx.venv / "bin" / "granian"),
                "--interface=rsgi",
                "--host=127.0.0.1",
                f"--port={port}",
                "--workers=1",
                "--http=1",
                "--no-ws",
                "--loop=uvloop",
                "--no-access-log",
                "--log-level=warning",
                "floor:app",
            ],
            cwd=ctx.work,
            url=f"http://127.0.0.1:{port}/",
            env={"BENCH_MODEL_FILE": str(ctx.model_file)},
        )


SERVER = GranianFloor()
