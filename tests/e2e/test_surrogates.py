"""End to end: lone surrogates (a JSON ``"\\ud800"`` escape, or its three bytes in a protobuf
string) in every string field the APIs echo get a 4xx with a readable message on REST v1, V2 and
both gRPC services, never a 5xx, an UNKNOWN or a traceback in the log."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator

import grpc
import pytest
import requests
from tritonclient.grpc import service_pb2 as v2_pb

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto.types_pb2 import DT_FLOAT
from tests.conftest import ServerProcess, launch
from tests.models import write_python_model

ECHO = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": inputs["x"]}
"""
TEXT_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "string", "shape": [-1]}], '
    '"outputs": [{"name": "y", "dtype": "string", "shape": [-1]}]}'
)
SURROGATES = [
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    *(chr(random.Random(23).randrange(0xD800, 0xE000)) for _ in range(4)),
]
"""Both ends of both halves of the surrogate range, and a few picked with a fixed seed."""
PLACEHOLDER = "QQQ"
"""Three ASCII bytes in a protobuf request, swapped for a surrogate's three (CESU-8) bytes."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    write_python_model(repo / "echo" / "1", ECHO)
    write_python_model(repo / "text" / "1", ECHO, TEXT_SIGNATURE)
    server = launch(tmp_path_factory.mktemp("log"), str(repo))
    server.wait_for(lambda: server.status("echo") == server.status("text") == {"1": "AVAILABLE"}, "models")
    yield server
    server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]


def _escape(text: str) -> str:
    """``text`` as a JSON string literal whose surrogates stay ``\\uXXXX`` escapes."""
    return json.dumps(text)  # ensure_ascii: every non-ASCII character, lone surrogates too, escaped


def _refused(response: requests.Response, surrogate: str) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    message = response.json()["error"]  # a JSON body that parses: the message was encodable
    assert surrogate not in message


REST_V1: dict[str, Callable[[str], tuple[str, str]]] = {
    "signature_name": lambda s: (
        "/v1/models/echo:predict",
        f'{{"signature_name": {_escape(s)}, "instances": [[1, 2]]}}',
    ),
    "instances key": lambda s: ("/v1/models/echo:predict", f'{{"instances": [{{{_escape(s)}: [1, 2]}}]}}'),
    "inputs key": lambda s: ("/v1/models/echo:predict", f'{{"inputs": {{{_escape(s)}: [[1, 2]]}}}}'),
}


@pytest.mark.parametrize("field", sorted(REST_V1))
@pytest.mark.parametrize("surrogate", SURROGATES, ids=[f"{ord(s):x}" for s in SURROGATES])
def test_rest_v1_fields(server: ServerProcess, field: str, surrogate: str) -> None:
    path, body = REST_V1[field](surrogate)
    response = requests.post(server.url + path, data=body.encode(), timeout=10)
    _refused(response, surrogate)


@pytest.mark.parametrize("surrogate", SURROGATES[:2], ids=[f"{ord(s):x}" for s in SURROGATES[:2]])
def test_rest_url_model_name_and_label(server: ServerProcess, surrogate: str) -> None:
    quoted = "".join(f"%{b:02X}" for b in surrogate.encode("utf-8", "surrogatepass"))
    # an unknown model: 404; an unknown label: 400, as TF Serving answers it
    for path, status in (
        (f"/v1/models/{quoted}:predict", 404),
        (f"/v1/models/echo/labels/{quoted}:predict", 400),
    ):
        response = requests.post(server.url + path, json={"instances": [[1, 2]]}, timeout=10)
        assert response.status_code == status, response.text
        response.json()
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
    for path in (f"/v2/models/{quoted}/infer", f"/v2/models/{quoted}"):
        response = requests.post(server.url + path, json={"inputs": [tensor]}, timeout=10)
        assert 400 <= response.status_code < 500, response.text
        response.json()


def test_rest_v1_string_value_is_echoed_escaped(server: ServerProcess) -> None:
    """A lone surrogate in a string tensor reaches the model, and its answer is still written."""
    body = f'{{"instances": [{_escape("a" + SURROGATES[0])}, "b"]}}'
    response = requests.post(f"{server.url}/v1/models/text:predict", data=body.encode(), timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == ["a\\ud800", "b"]


V2_REST: dict[str, Callable[[str], tuple[str, str]]] = {
    "input name": lambda s: (
        "/v2/models/echo/infer",
        f'{{"inputs": [{{"name": {_escape(s)}, "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}}]}}',
    ),
    "output name": lambda s: (
        "/v2/models/echo/infer",
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}], '
        f'"outputs": [{{"name": {_escape(s)}}}]}}',
    ),
    "id": lambda s: (
        "/v2/models/echo/infer",
        f'{{"id": {_escape(s)}, "inputs": '
        '[{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}',
    ),
    "datatype": lambda s: (
        "/v2/models/echo/infer",
        f'{{"inputs": [{{"name": "x", "datatype": {_escape(s)}, "shape": [1, 2], "data": [1, 2]}}]}}',
    ),
    "load parameters": lambda s: (
        "/v2/repository/models/echo/load",
        f'{{"parameters": {{{_escape(s)}: 1}}}}',
    ),
}


@pytest.mark.parametrize("field", sorted(V2_REST))
@pytest.mark.parametrize("surrogate", SURROGATES, ids=[f"{ord(s):x}" for s in SURROGATES])
def test_rest_v2_fields(server: ServerProcess, field: str, surrogate: str) -> None:
    path, body = V2_REST[field](surrogate)
    response = requests.post(server.url + path, data=body.encode(), timeout=10)
    _refused(response, surrogate)


def _v2_infer(
    model: str = "echo", name: str = "x", output: str = "y", id_: str = ""
) -> v2_pb.ModelInferRequest:
    request = v2_pb.ModelInferRequest(model_name=model, id=id_)
    tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    request.outputs.add(name=output)
    return request


def _tf_predict(
    model: str = "echo", signature: str = "", name: str = "x", output: str = "y"
) -> ps.PredictRequest:
    request = ps.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    tensor = request.inputs[name]
    tensor.dtype = DT_FLOAT
    tensor.tensor_shape.dim.add(size=1)
    tensor.tensor_shape.dim.add(size=2)
    tensor.float_val.extend([1.0, 2.0])
    request.output_filter.append(output)
    return request


GRPC: dict[str, tuple[str, bytes]] = {
    "v2 model name": (
        "/inference.GRPCInferenceService/ModelInfer",
        _v2_infer(model=PLACEHOLDER).SerializeToString(),
    ),
    "v2 input name": (
        "/inference.GRPCInferenceService/ModelInfer",
        _v2_infer(name=PLACEHOLDER).SerializeToString(),
    ),
    "v2 output name": (
        "/inference.GRPCInferenceService/ModelInfer",
        _v2_infer(output=PLACEHOLDER).SerializeToString(),
    ),
    "v2 id": ("/inference.GRPCInferenceService/ModelInfer", _v2_infer(id_=PLACEHOLDER).SerializeToString()),
    "tf model name": (
        "/tensorflow.serving.PredictionService/Predict",
        _tf_predict(model=PLACEHOLDER).SerializeToString(),
    ),
    "tf signature_name": (
        "/tensorflow.serving.PredictionService/Predict",
        _tf_predict(signature=PLACEHOLDER).SerializeToString(),
    ),
    "tf input name": (
        "/tensorflow.serving.PredictionService/Predict",
        _tf_predict(name=PLACEHOLDER).SerializeToString(),
    ),
    "tf output_filter": (
        "/tensorflow.serving.PredictionService/Predict",
        _tf_predict(output=PLACEHOLDER).SerializeToString(),
    ),
}


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


@pytest.mark.parametrize("field", sorted(GRPC))
@pytest.mark.parametrize("surrogate", SURROGATES[:3], ids=[f"{ord(s):x}" for s in SURROGATES[:3]])
def test_grpc_fields(channel: grpc.Channel, field: str, surrogate: str) -> None:
    method, valid = GRPC[field]
    assert valid.count(PLACEHOLDER.encode()) == 1
    data = valid.replace(PLACEHOLDER.encode(), surrogate.encode("utf-8", "surrogatepass"))
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as refused:
        call(data, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
