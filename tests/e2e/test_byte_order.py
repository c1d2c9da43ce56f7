"""A model that returns big-endian numbers (``>f4``, ``>i8``) is answered with their values on
every API (a V2 binary answer of them was a 500: the encoders know the machine's byte order only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import ServerProcess
from tests.models import write_python_model

BIG_ENDIAN = """
def load(self):
    pass

def predict(self, inputs):
    x = inputs["x"]
    return {"y": (x * 2).astype(">f4"), "n": np.arange(len(x), dtype=">i8")}
"""
SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}, '
    '{"name": "n", "dtype": "int64", "shape": [-1]}]}'
)


def test_big_endian_outputs_are_answered_with_their_values(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_python_model(tmp_path / "m" / "1", BIG_ENDIAN, SIGNATURE)
    server = start_server(f"--model_base_path={tmp_path / 'm'}", "--model_name=m")
    x = np.array([[1.5, -2.0], [3.0, 4.25]], dtype=np.float32)

    v1 = requests.post(f"{server.url}/v1/models/m:predict", json={"instances": x.tolist()}, timeout=10)
    assert v1.status_code == 200, v1.text
    assert v1.json()["predictions"] == [{"y": [3.0, -4.0], "n": 0}, {"y": [6.0, 8.5], "n": 1}]

    for client, module in (
        (httpclient.InferenceServerClient(server.url.removeprefix("http://")), httpclient),
        (grpcclient.InferenceServerClient(server.grpc_target), grpcclient),
    ):
        given = module.InferInput("x", [2, 2], "FP32")
        given.set_data_from_numpy(x)
        wanted = (
            [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("y", "n")]
            if module is httpclient
            else [grpcclient.InferRequestedOutput(n) for n in ("y", "n")]
        )
        result = client.infer("m", [given], outputs=wanted)
        np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
        np.testing.assert_array_equal(result.as_numpy("n"), [0, 1])
