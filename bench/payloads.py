"""Request bodies and answers in each wire format the benchmarks send: TF Serving's row format
(``{"instances": ...}``), KServe V2 JSON and V2 binary tensors (Triton's binary extension), for a
model with one FP32 input called ``input`` and one output."""

from __future__ import annotations

import json

import numpy as np

JSON_HEADERS = {"Content-Type": "application/json"}


def v1_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"instances": x.tolist()}).encode(), dict(JSON_HEADERS)


def v2_json_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode(), dict(JSON_HEADERS)


def v2_binary_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A JSON header asking for a binary answer, then ``x`` as little-endian float32."""
    tensor = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": x.nbytes},
    }
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + x.astype("<f4").tobytes(), headers


def v1_answer(body: bytes) -> np.ndarray:
    return np.asarray(json.loads(body)["predictions"], np.float32)


def v2_answer(headers: dict[str, str], body: bytes) -> np.ndarray:
    """The first output of a V2 answer, JSON or binary (``headers`` with lower-case names)."""
    size = headers.get("inference-header-content-length")
    doc = json.loads(body[: int(size)] if size else body)
    out = doc["outputs"][0]
    if size:
        return np.frombuffer(body[int(size) :], "<f4").reshape(out["shape"])
    return np.asarray(out["data"], np.float32).reshape(out["shape"])
