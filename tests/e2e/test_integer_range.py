"""End to end: an integer outside its datatype's range is refused with INVALID_ARGUMENT naming the
input, the datatype and the value, on every protocol and field that carries typed integers,
instead of wrapping silently (INT8 300 reaching the model as 44). A float past FP32's range is
an infinity where the peers read it as one (JSON numbers), and refused where they refuse the
tensor (one of another declared dtype)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import requests
from tritonclient.grpc import service_pb2 as v2_pb
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from inferd._proto import types_pb2
from tests.conftest import ServerProcess, launch
from tests.models import write_python_model

ECHO = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": inputs["x"]}
"""

CASES = [
    # V2 datatype, numpy name, a value outside its range, a value inside
    ("INT8", "int8", 300, -128),
    ("UINT8", "uint8", -1, 255),
    ("INT16", "int16", 40000, -32768),
    ("UINT16", "uint16", 70000, 65535),
    ("INT32", "int32", 2**31, -(2**31)),
]
IDS = [case[0] for case in CASES]
NARROW = CASES[:-1]
"""The datatypes that gRPC's int32 fields (int_contents, int_val) carry in a wider type."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    for datatype, numpy_name, _, _ in CASES:
        signature = (
            f'{{"inputs": [{{"name": "x", "dtype": "{numpy_name}", "shape": [-1]}}], '
            f'"outputs": [{{"name": "y", "dtype": "{numpy_name}", "shape": [-1]}}]}}'
        )
        write_python_model(repo / datatype.lower() / "1", ECHO, signature)
    floats = (
        '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1]}], '
        '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}]}'
    )
    write_python_model(repo / "fp32" / "1", ECHO, floats)
    server = launch(tmp_path_factory.mktemp("log"), str(repo))
    names = [c[0].lower() for c in CASES] + ["fp32"]
    server.wait_for(lambda: all(server.status(name) == {"1": "AVAILABLE"} for name in names), "models")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


def _names_the_value(message: str, datatype: str, value: int) -> None:
    assert "'x'" in message, message
    assert datatype in message, message
    assert str(value) in message, message


@pytest.mark.parametrize(("datatype", "numpy_name", "bad", "good"), CASES, ids=IDS)
def test_v2_rest_json(server: ServerProcess, datatype: str, numpy_name: str, bad: int, good: int) -> None:
    url = f"{server.url}/v2/models/{datatype.lower()}/infer"

    def infer(value: int) -> requests.Response:
        tensor = {"name": "x", "datatype": datatype, "shape": [2], "data": [1, value]}
        return requests.post(url, json={"inputs": [tensor]}, timeout=10)

    refused = infer(bad)
    assert refused.status_code == 400, refused.text
    _names_the_value(refused.json()["error"], datatype, bad)
    answered = infer(good)
    assert answered.status_code == 200, answered.text
    assert answered.json()["outputs"][0]["data"] == [1, good]


@pytest.mark.parametrize(("datatype", "numpy_name", "bad", "good"), CASES, ids=IDS)
def test_tfserving_rest(server: ServerProcess, datatype: str, numpy_name: str, bad: int, good: int) -> None:
    url = f"{server.url}/v1/models/{datatype.lower()}:predict"
    refused = requests.post(url, json={"instances": [1, bad]}, timeout=10)
    assert refused.status_code == 400, refused.text
    _names_the_value(refused.json()["error"], datatype, bad)
    answered = requests.post(url, json={"instances": [1, good]}, timeout=10)
    assert answered.status_code == 200, answered.text
    assert answered.json()["predictions"] == [1, good]


def test_tfserving_rest_integer_past_float_precision_rounds_as_tf_serving(server: ServerProcess) -> None:
    """TF Serving's json_tensor.cc reads any JSON number for DT_FLOAT (``GetFloat``), an integer
    that FP32 cannot hold exactly included (its test FloatTensorWithPrecisionLoss: 1435774380 is
    accepted, as 1435774380.0 is): rounded, not refused."""
    url = f"{server.url}/v1/models/fp32:predict"
    sent = [2**24 + 1, 1435774380, -(2**31) - 1, 2**63 - 1]
    for instances in (sent, [float(v) for v in sent[:3]]):
        answered = requests.post(url, json={"instances": instances}, timeout=10)
        assert answered.status_code == 200, answered.text
        got = [np.float32(v) for v in answered.json()["predictions"]]
        assert got == [np.float32(v) for v in instances]
        assert got[:2] == [np.float32(2**24), np.float32(1435774336)]


DOUBLE_MAX = float(np.finfo(np.float64).max)
PAST_FP32 = [DOUBLE_MAX, -DOUBLE_MAX, 1e39, -1e300, 1.5]
AS_FP32 = [math.inf, -math.inf, math.inf, -math.inf, 1.5]


def test_tfserving_rest_float_past_fp32_is_an_infinity_as_in_tf_serving(server: ServerProcess) -> None:
    """TF Serving's json_tensor.cc reads a JSON number for DT_FLOAT with ``GetFloat``: past FP32's
    range it is an infinity (its test FloatTensorThatExceedsMaxReturnsInf: the largest double is
    inf, its negative -inf), not refused; numpy's overflow warning stays out of the log."""
    url = f"{server.url}/v1/models/fp32:predict"
    for body, key in (({"instances": PAST_FP32}, "predictions"), ({"inputs": PAST_FP32}, "outputs")):
        answered = requests.post(url, json=body, timeout=10)
        assert answered.status_code == 200, answered.text
        assert json.loads(answered.text)[key] == AS_FP32
    assert "overflow" not in server.log()


def test_v2_rest_float_past_fp32_is_an_infinity_as_in_triton_and_kserve(server: ServerProcess) -> None:
    """FP32 JSON data: Triton assigns each number, read as a double, to a float (http_server.cc,
    ReadDataFromJsonHelper) and KServe reads it with ``np.array(data, dtype=np.float32)``; both
    make a number past FP32's range an infinity. FP64 data for the FP32 input, which Triton
    refuses outright (a datatype mismatch), is refused where the cast would make an infinity."""
    url = f"{server.url}/v2/models/fp32/infer"
    tensor = {"name": "x", "datatype": "FP32", "shape": [5], "data": PAST_FP32}
    binary = [{"name": "y", "parameters": {"binary_data": True}}]  # JSON answers write null for inf
    answered = requests.post(url, json={"inputs": [tensor], "outputs": binary}, timeout=10)
    assert answered.status_code == 200, answered.text
    header = int(answered.headers["Inference-Header-Content-Length"])
    assert np.frombuffer(answered.content[header:], np.float32).tolist() == AS_FP32
    refused = requests.post(url, json={"inputs": [{**tensor, "datatype": "FP64"}]}, timeout=10)
    assert refused.status_code == 400, refused.text
    assert "input 'x': datatype FP32 cannot hold 1.7976931348623157e+308" in refused.json()["error"]
    assert "overflow" not in server.log()


def test_grpc_double_past_fp32_for_an_fp32_input_is_refused(channel: grpc.Channel) -> None:
    """TF Serving gRPC refuses a DT_DOUBLE tensor for a DT_FLOAT input outright ("Expects arg[0]
    to be float but double is provided"), Triton an FP64 one for FP32; inferd casts it, refusing a
    value the cast would make an infinity, over both gRPC APIs."""
    request = ps.PredictRequest()
    request.model_spec.name = "fp32"
    request.inputs["x"].dtype = types_pb2.DT_DOUBLE
    request.inputs["x"].tensor_shape.dim.add(size=2)
    request.inputs["x"].double_val.extend([1.0, 1e300])
    with pytest.raises(grpc.RpcError) as refused:
        ps_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "datatype FP32 cannot hold 1e+300" in (refused.value.details() or "")
    v2 = v2_pb.ModelInferRequest(model_name="fp32")
    v2.inputs.add(name="x", datatype="FP64", shape=[2]).contents.fp64_contents.extend([1.0, -1e300])
    with pytest.raises(grpc.RpcError) as refused:
        v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(v2, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "datatype FP32 cannot hold -1e+300" in (refused.value.details() or "")


@pytest.mark.parametrize(("datatype", "numpy_name", "bad", "good"), NARROW, ids=IDS[:-1])
def test_v2_grpc_typed_contents(
    channel: grpc.Channel, datatype: str, numpy_name: str, bad: int, good: int
) -> None:
    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    field = "uint_contents" if datatype.startswith("UINT") else "int_contents"

    def infer(value: int) -> v2_pb.ModelInferResponse:
        request = v2_pb.ModelInferRequest(model_name=datatype.lower())
        tensor = request.inputs.add(name="x", datatype=datatype, shape=[2])
        getattr(tensor.contents, field).extend([1, value])
        return stub.ModelInfer(request, timeout=10)

    if bad < 0 and field == "uint_contents":
        bad = 2**32 - 1  # uint_contents cannot carry -1: the largest uint32 is out of range instead
    with pytest.raises(grpc.RpcError) as refused:
        infer(bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _names_the_value(refused.value.details() or "", datatype, bad)
    reply = infer(good)
    assert reply.outputs[0].datatype == datatype


@pytest.mark.parametrize(("datatype", "numpy_name", "bad", "good"), NARROW, ids=IDS[:-1])
def test_tfserving_grpc_int_val(
    channel: grpc.Channel, datatype: str, numpy_name: str, bad: int, good: int
) -> None:
    stub = ps_grpc.PredictionServiceStub(channel)

    def predict(value: int) -> ps.PredictResponse:
        request = ps.PredictRequest()
        request.model_spec.name = datatype.lower()
        tensor = request.inputs["x"]
        tensor.dtype = types_pb2.DataType.Value(f"DT_{datatype}")
        tensor.tensor_shape.dim.add(size=2)
        tensor.int_val.extend([1, value])
        return stub.Predict(request, timeout=10)

    with pytest.raises(grpc.RpcError) as refused:
        predict(bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _names_the_value(refused.value.details() or "", datatype, bad)
    predict(good)


def test_v2_rest_int32_lower_edge(server: ServerProcess) -> None:
    """INT32 takes -2**31 (above) and refuses one below it."""
    url = f"{server.url}/v2/models/int32/infer"
    tensor = {"name": "x", "datatype": "INT32", "shape": [1], "data": [-(2**31) - 1]}
    refused = requests.post(url, json={"inputs": [tensor]}, timeout=10)
    assert refused.status_code == 400
    _names_the_value(refused.json()["error"], "INT32", -(2**31) - 1)
