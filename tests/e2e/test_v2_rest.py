"""The Open Inference Protocol over REST, driven by Triton's own client (tritonclient.http)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess, launch
from tests.models import digits, write_onnx_digits, write_onnx_two_inputs, write_python_model

TEXT_MODEL = """
def load(self):
    pass

def predict(self, inputs):
    texts = inputs["text"]
    lengths = np.array([len(t) for t in texts.reshape(-1)], dtype=np.int32).reshape(texts.shape)
    upper = np.array([t.upper() for t in texts.reshape(-1)], dtype=object).reshape(texts.shape)
    return {"length": lengths, "upper": upper}
"""
TEXT_SIGNATURE = (
    '{"inputs": [{"name": "text", "dtype": "string", "shape": [-1]}], '
    '"outputs": [{"name": "length", "dtype": "int32", "shape": [-1]}, '
    '{"name": "upper", "dtype": "string", "shape": [-1]}]}'
)
HALF_MODEL = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": inputs["x"] * np.float16(2)}
"""
HALF_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float16", "shape": [-1, 3]}], '
    '"outputs": [{"name": "y", "dtype": "float16", "shape": [-1, 3]}]}'
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("v2")
    write_onnx_digits(repo / "digits" / "1")
    write_onnx_two_inputs(repo / "pair" / "1")
    write_python_model(repo / "text" / "1", TEXT_MODEL, TEXT_SIGNATURE)
    write_python_model(repo / "half" / "1", HALF_MODEL, HALF_SIGNATURE)
    (repo / "digits" / "inferd.toml").write_text("[batching]\nmax_batch_size = 16\n")
    process = launch(repo, str(repo))
    yield process
    process.stop()


@pytest.fixture
def client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("nosuch")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "inferd"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_and_config(client: httpclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("digits")
    assert metadata["name"] == "digits"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == {
        "label": "INT64",
        "probabilities": "FP32",
    }
    config = client.get_model_config("digits")
    assert config["max_batch_size"] == 16
    assert config["input"] == [{"name": "X", "data_type": "TYPE_FP32", "dims": [64]}]
    assert "dynamic_batching" in config
    assert client.get_model_config("pair")["max_batch_size"] == 0
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nosuch' is not found"):
        client.get_model_metadata("nosuch")


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_v1_and_in_process_outputs(
    server: ServerProcess, client: httpclient.InferenceServerClient, binary: bool
) -> None:
    import onnxruntime as ort

    x = digits()[0][:5]
    tensor = httpclient.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")
    ]
    result = client.infer("digits", [tensor], outputs=outputs, request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_version"] == "1"

    model_path = Path(server.log_path).parent / "digits" / "1" / "model.onnx"
    label, proba = ort.InferenceSession(str(model_path)).run(None, {"X": x})
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), proba)
    v1 = requests.post(
        f"{server.url}/v1/models/digits:predict", json={"inputs": x.tolist()}, timeout=10
    ).json()
    np.testing.assert_array_equal(np.asarray(v1["outputs"]["probabilities"], np.float32), proba)


def test_output_selection_and_two_inputs(client: httpclient.InferenceServerClient) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[10], [20]], dtype=np.int64)
    inputs = [httpclient.InferInput("a", [2, 3], "FP32"), httpclient.InferInput("b", [2, 1], "INT64")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b, binary_data=False)
    result = client.infer("pair", inputs, outputs=[httpclient.InferRequestedOutput("sum")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["sum"]
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    assert result.as_numpy("count") is None


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors(client: httpclient.InferenceServerClient, binary: bool) -> None:
    texts = np.array([b"hello", b"inferd", b""], dtype=object)
    tensor = httpclient.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(texts, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("length", "upper")]
    result = client.infer("text", [tensor], outputs=outputs)
    assert result.as_numpy("length").tolist() == [5, 6, 0]
    upper = [u if isinstance(u, bytes) else u.encode() for u in result.as_numpy("upper").tolist()]
    assert upper == [b"HELLO", b"INFERD", b""]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client: httpclient.InferenceServerClient, algorithm: str) -> None:
    # tritonclient's request_compression_algorithm: the body was read as it came, a 400
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[10], [20]], dtype=np.int64)
    inputs = [httpclient.InferInput("a", [2, 3], "FP32"), httpclient.InferInput("b", [2, 1], "INT64")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b, binary_data=False)
    result = client.infer("pair", inputs, request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)


def test_compressed_bodies_are_checked(server: ServerProcess) -> None:
    body = zlib.compress(request_json())

    def post(data: bytes, encoding: str) -> requests.Response:
        url = f"{server.url}/v2/models/digits/infer"
        return requests.post(url, data=data, headers={"Content-Encoding": encoding}, timeout=30)

    assert post(body, "Deflate").status_code == 200
    live = requests.get(f"{server.url}/v2/health/live", headers={"Content-Encoding": "gzip"}, timeout=10)
    assert live.status_code == 200
    assert post(body, "identity").status_code == 400  # read as it came: not JSON
    for data, encoding, status, fragment in [
        (body, "br", 400, "Content-Encoding 'br' is not supported"),
        (body[:-4], "deflate", 400, "not one whole deflate stream"),
        (b"not gzip", "gzip", 400, "not valid gzip data"),
        (zlib.compress(bytes(65 << 20)), "deflate", 413, "decompresses to more than the limit"),
    ]:
        response = post(data, encoding)
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"]


def test_fp16_travels_as_binary(client: httpclient.InferenceServerClient) -> None:
    x = np.array([[1.5, -2.0, 0.25]], dtype=np.float16)
    tensor = httpclient.InferInput("x", [1, 3], "FP16")
    tensor.set_data_from_numpy(x)
    result = client.infer("half", [tensor])
    assert result.as_numpy("y").dtype == np.float16
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)


def infer_raw(server: ServerProcess, body: bytes, header_length: int | None = None) -> requests.Response:
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    return requests.post(f"{server.url}/v2/models/digits/infer", data=body, headers=headers, timeout=10)


def request_json(**tensor: object) -> bytes:
    entry = {"name": "X", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64, **tensor}
    return json.dumps({"inputs": [entry]}).encode()


@pytest.mark.parametrize(
    ("body", "header_length", "status", "fragment"),
    [
        (request_json(shape=[1, 63]), None, 400, "shape needs 63 elements, 'data' has 64"),
        (request_json(datatype="FP99"), None, 400, "unknown datatype 'FP99'"),
        (request_json(datatype="INT64"), None, 400, "datatype INT64 cannot hold JSON values"),
        (request_json(data=["a"] * 64), None, 400, "datatype FP32 cannot hold JSON values"),
        (request_json(data=[1.0, None] + [0.0] * 62), None, 400, "cannot hold JSON values like null (null)"),
        (request_json(data=[1.0, {"a": 1}] + [0.0] * 62), None, 400, 'values like {"a": 1} (object)'),
        (request_json(shape=[1, -64]), None, 400, "'shape' must be a list of non-negative integers"),
        (request_json(name="Y"), None, 400, "missing ['X'], unexpected ['Y']"),
        (b'{"inputs": []}', None, 400, "'inputs' must be a non-empty list"),
        (b"{not json", None, 400, "JSON Parse error"),
        # FP64 data for the FP32 input (Triton refuses any): refused where the cast makes an infinity
        (
            request_json(datatype="FP64", data=[1e39] + [0.0] * 63),
            None,
            400,
            "datatype FP32 cannot hold 1e+39",
        ),
        (
            request_json(data=[0.5, True] + [0.0] * 62),
            None,
            400,
            "FP32 cannot hold JSON values like true (boolean)",
        ),
        (
            request_json(data=[[0.5] * 63 + [False]]),
            None,
            400,
            "cannot hold JSON values like false (boolean)",
        ),
        (request_json(datatype="FP64", data=[[0.0] * 63 + [-1e300]]), None, 400, "FP32 cannot hold -1e+300"),
        (
            request_json(datatype="FP64", shape=[20, 64], data=[0.0] * 1279 + [1e39]),
            None,
            400,
            "FP32 cannot hold 1e+39",
        ),
        (
            json.dumps({**json.loads(request_json()), "outputs": [{"name": "probabilities"}] * 2}).encode(),
            None,
            400,
            "output 'probabilities' appears more than once in 'outputs'",
        ),
        (request_json(datatype="BYTES", data=["a"] * 63 + [1]), None, 400, "'data' mixes strings with other"),
        (request_json(parameters=[1]), None, 400, "input 'X': 'parameters' must be an object"),
        (
            json.dumps({"inputs": [json.loads(request_json())["inputs"][0]] * 2}).encode(),
            None,
            400,
            "input 'X' appears more than once in 'inputs'",
        ),
        (
            json.dumps(
                {**json.loads(request_json()), "parameters": {"binary_data_output": "false"}}
            ).encode(),
            None,
            400,
            "parameters.binary_data_output must be true or false, got 'false'",
        ),
        (
            json.dumps(
                {
                    **json.loads(request_json()),
                    "outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}],
                }
            ).encode(),
            None,
            400,
            "output 'probabilities': parameters.binary_data must be true or false, got 1",
        ),
        # Triton refuses an 'id' that is not a string; ignoring it answered without the id
        (json.dumps({**json.loads(request_json()), "id": 42}).encode(), None, 400, "'id' must be a string"),
        (request_json(), 0, 400, "raw binary request"),
    ],
)
def test_bad_json_requests(
    server: ServerProcess, body: bytes, header_length: int | None, status: int, fragment: str
) -> None:
    response = infer_raw(server, body, header_length)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    ("b", "fragment"),
    [
        ([1, 2.5], "datatype INT64 cannot hold JSON values like 2.5 (number)"),  # as sent, not 1.0
        ([[1], [True]], "datatype INT64 cannot hold JSON values like true (boolean)"),
    ],
)
def test_a_misfit_is_quoted_as_sent(server: ServerProcess, b: list[object], fragment: str) -> None:
    a = {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": [0.5] * 6}
    body = {"inputs": [a, {"name": "b", "shape": [2, 1], "datatype": "INT64", "data": b}]}
    response = requests.post(f"{server.url}/v2/models/pair/infer", json=body, timeout=10)
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_numbers_in_a_body_that_names_true(server: ServerProcess) -> None:
    # "true" elsewhere in the body only makes the decoder look for booleans among the numbers.
    body = json.dumps({**json.loads(request_json()), "id": "true", "parameters": {"x": False}}).encode()
    response = infer_raw(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "true"


def test_float_data_up_to_the_datatype_largest_value(server: ServerProcess) -> None:
    # 3.4028235e38 is above FP32's largest value in float64, and rounds to it in FP32.
    response = infer_raw(server, request_json(data=[3.4028235e38, -3.4028235e38] + [0.0] * 62))
    assert response.status_code == 200, response.text


def test_bad_binary_requests(server: ServerProcess) -> None:
    header = json.dumps(
        {
            "inputs": [
                {"name": "X", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
            ]
        }
    ).encode()
    data = np.zeros(64, np.float32).tobytes()
    ok = infer_raw(server, header + data, len(header))
    assert ok.status_code == 200, ok.text
    missing_header = infer_raw(server, header + data)
    assert missing_header.status_code == 400
    assert "Inference-Header-Content-Length".lower() in missing_header.json()["error"].lower()
    short = infer_raw(server, header + data[:100], len(header))
    assert short.status_code == 400
    assert "binary_data_size 256 does not fit" in short.json()["error"]
    extra = infer_raw(server, header + data + b"xx", len(header))
    assert extra.status_code == 400
    assert "2 binary bytes that no input claims" in extra.json()["error"]
    wrong_size = json.dumps(
        {
            "inputs": [
                {"name": "X", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 255}}
            ]
        }
    ).encode()
    response = infer_raw(server, wrong_size + data[:255], len(wrong_size))
    assert response.status_code == 400
    assert "take 256 bytes, binary_data_size says 255" in response.json()["error"]
    too_long = infer_raw(server, header + data, len(header) + len(data) + 1)
    assert too_long.status_code == 400


def test_unknown_output_and_unknown_model(server: ServerProcess) -> None:
    body = json.loads(request_json())
    body["outputs"] = [{"name": "nope"}]
    response = requests.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=10)
    assert response.status_code == 400
    assert "unknown output 'nope'" in response.json()["error"]
    response = requests.post(f"{server.url}/v2/models/nosuch/infer", json=body, timeout=10)
    assert response.status_code == 404
    response = requests.post(f"{server.url}/v2/models/digits/versions/9/infer", json=body, timeout=10)
    assert response.status_code == 404
    # and good requests still work
    assert (
        requests.post(f"{server.url}/v2/models/digits/infer", data=request_json(), timeout=10).status_code
        == 200
    )


def test_a_header_length_of_thousands_of_digits_is_a_400(server: ServerProcess) -> None:
    response = requests.post(
        f"{server.url}/v2/models/digits/infer",
        data=request_json(),
        headers={"Inference-Header-Content-Length": "9" * 5000},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert "must be a byte count within the body" in response.json()["error"]


def test_non_finite_outputs_are_written_as_null_in_strict_json(server: ServerProcess) -> None:
    """As KServe's server writes them: its client (orjson) and browsers refuse NaN tokens."""
    header = json.dumps(
        {
            "inputs": [
                {"name": "X", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
            ]
        }
    ).encode()
    response = infer_raw(server, header + np.full(64, np.nan, np.float32).tobytes(), len(header))
    assert response.status_code == 200, response.text
    outputs = {tensor["name"]: tensor for tensor in orjson.loads(response.content)["outputs"]}
    assert outputs["probabilities"]["data"] == [None] * 10


@pytest.mark.parametrize("instances", [["ab", 1], ["ab", True], [1, "ab"]])
def test_numbers_among_strings_are_refused_not_made_text(
    server: ServerProcess, instances: list[object]
) -> None:
    """numpy reads ["ab", 1] as the strings "ab" and "1"; TF Serving refuses the number."""
    response = requests.post(
        f"{server.url}/v1/models/text:predict", json={"instances": instances}, timeout=10
    )
    assert response.status_code == 400, response.text
    assert "values of different JSON types" in response.json()["error"]
    assert "'text'" in response.json()["error"]
