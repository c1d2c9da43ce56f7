"""A number past a float input's range: the JSON readers make it an infinity, as the peers do
(TF Serving's json_tensor.cc reads a JSON number for DT_FLOAT with ``GetFloat``, its test
FloatTensorThatExceedsMaxReturnsInf; Triton's http_server.cc assigns the double to a float for
FP32; KServe's ``InferInput.as_numpy`` is ``np.array(data, dtype)``). A tensor of another declared
dtype (V2 FP64, TF Serving gRPC DT_DOUBLE), which Triton and TF Serving refuse outright and inferd
casts, is refused when the cast would make an infinity (``conform``). That numpy's warning about
the overflow stays out of the server's log is tested end to end (test_integer_range.py): pytest
drops the filters a module installs while the tests are collected."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from inferd.config import ServerConfig
from inferd.errors import InvalidArgument
from inferd.protocols.limits import RequestLimits
from inferd.protocols.tfserving_rest import TensorDecoder
from inferd.protocols.v2_rest import decode_inputs
from inferd.service import conform
from inferd.types import Signature, TensorSpec

LIMITS = RequestLimits.of(ServerConfig())
DOUBLE_MAX = float(np.finfo(np.float64).max)
SENT = [DOUBLE_MAX, -DOUBLE_MAX, 1e39, -1e300, 1.5, 7]
READ = [math.inf, -math.inf, math.inf, -math.inf, 1.5, 7.0]


def _signature(dtype: type[np.floating]) -> Signature:
    return Signature("serving_default", (TensorSpec("x", np.dtype(dtype), (-1,)),), ())


def test_tfserving_rest_reads_a_number_past_fp32_as_an_infinity_as_tf_serving() -> None:
    signature = _signature(np.float32)
    document = orjson.loads(orjson.dumps({"instances": SENT, "inputs": SENT}))  # as the server parses it
    rows = TensorDecoder(LIMITS).rows(signature, document["instances"])["x"]
    columns = TensorDecoder(LIMITS).columns(signature, document["inputs"])["x"]
    for value in (rows, columns):
        assert value.dtype == np.float32
        assert value.tolist() == READ
        assert conform(signature.inputs[0], value) is value  # read as FP32: nothing left to cast


@pytest.mark.parametrize(("datatype", "dtype"), [("FP32", np.float32), ("FP16", np.float16)])
def test_v2_json_reads_a_number_past_the_datatype_as_an_infinity_as_triton_and_kserve(
    datatype: str, dtype: type[np.floating]
) -> None:
    entry = orjson.loads(orjson.dumps({"name": "x", "datatype": datatype, "shape": [6], "data": SENT}))
    value = decode_inputs([entry], memoryview(b""), LIMITS)["x"]
    assert value.dtype == dtype
    assert value.tolist() == READ
    with np.errstate(over="ignore"):
        assert np.array(SENT, dtype=dtype).tolist() == READ  # what KServe's as_numpy makes of them


@pytest.mark.parametrize(
    "sent", [np.array([1.0, 1e300]), np.array([-1e39, 0.0]), np.array([70000], np.int32)]
)
def test_a_cast_from_another_declared_dtype_still_refuses_an_overflow(sent: np.ndarray) -> None:
    spec = TensorSpec("x", np.dtype(np.float16 if sent.dtype.kind == "i" else np.float32), (-1,))
    with pytest.raises(InvalidArgument, match="cannot hold"):
        conform(spec, sent)
