"""In-process upper bounds: what one Python process can do with the same ONNX model, no HTTP.

- ``ort``: ``session.run`` on a ready float32 array in a tight loop.
- ``full_path``: request bytes -> orjson -> numpy -> onnxruntime -> orjson bytes, in a loop: the
  least work any JSON server must do per request.

Both single-threaded loops with onnxruntime's default session options.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson


def _loop(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            fn()
        n += 20
    return n, elapsed


def measure(model_file: Path, x: np.ndarray, seconds: float, threads: int = 0) -> dict[str, float]:
    """Calls, predictions and microseconds per call of both loops, ``seconds`` each, with
    ``threads`` intra-op threads in onnxruntime (0: its default, one per core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    body = json.dumps({"instances": x.tolist()}).encode()

    def ort_only() -> None:
        session.run(None, {name: x})

    def full_path() -> None:
        inputs = np.asarray(orjson.loads(body)["instances"], dtype=np.float32)
        y = session.run(None, {name: inputs})[0]
        orjson.dumps({"predictions": y}, option=orjson.OPT_SERIALIZE_NUMPY)

    out: dict[str, float] = {}
    for key, fn in (("ort", ort_only), ("full_path", full_path)):
        n, elapsed = _loop(fn, seconds)
        out[f"{key}_calls_per_s"] = n / elapsed
        out[f"{key}_pred_per_s"] = n * len(x) / elapsed
        out[f"{key}_us_per_call"] = elapsed / n * 1e6
    return out
