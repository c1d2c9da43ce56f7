"""A floor, not an alternative: the least a Python server on uvicorn can do per request. A bare
ASGI app (no framework), uvicorn with httptools, uvloop and no access log, orjson in and out, and
onnxruntime run inline on the event loop (no thread handoff, no validation, no metrics). The
report keeps it out of the comparisons with alternatives and shows how far inferd is from it."""

from __future__ import annotations

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
HEADERS = [(b"content-type", b"application/json")]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    x = np.asarray(orjson.loads(body)["instances"], dtype=np.float32)
    y = session.run(None, {input_name: x})[0]
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    out = orjson.dumps({"predictions": y}, option=orjson.OPT_SERIALIZE_NUMPY)
    await send({"type": "http.response.body", "body": out})
"""


class AsgiFloor(Server):
    name = "asgi-floor"
    uses_project_venv = True
    report_packages = ("uvicorn", "httptools", "uvloop", "orjson", "onnxruntime")

    def launch(self, ctx: Context, port: int) -> Launch:
        write(ctx.work / "floor.py", APP)
        return Launch(
            cmd=[
                str(ctx.venv / "bin" / "uvicorn"),
                "floor:app",
                "--host=127.0.0.1",
                f"--port={port}",
                "--http=httptools",
                "--loop=uvloop",
                "--no-access-log",
                "--lifespan=off",
                "--log-level=warning",
            ],
            cwd=ctx.work,
            url=f"http://127.0.0.1:{port}/",
            env={"BENCH_MODEL_FILE": str(ctx.model_file)},
        )


SERVER = AsgiFloor()
