"""End to end: bad requests get TF Serving's 4xx status and an ``{"error": ...}`` that names what
was wrong, and the server keeps answering good requests after each of them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import ServerProcess, launch
from tests.models import (
    digits,
    digits_classifier,
    write_onnx_affine,
    write_onnx_two_inputs,
    write_sklearn_digits,
)

LIMIT = 1000
"""--max_request_bytes of the server under test; every request below but one stays under it."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("bad_input")
    models = root / "models"
    write_sklearn_digits(models / "digits" / "1")  # inputs: FP64 [-1, 64]
    (models / "digits" / "inferd.toml").write_text("[labels]\nstable = 1\n")
    write_onnx_two_inputs(models / "pair" / "1")  # a: FP32 [-1, 3], b: INT64 [-1, 1]
    write_onnx_affine(models / "affine" / "1", scale=2.0, offset=1.0)  # x: FP32 [-1, 4]
    process = launch(root, str(models), f"--max_request_bytes={LIMIT}")
    yield process
    process.stop()


ROW = digits()[0][0].tolist()
"""One digits example: 64 floats."""
LABEL = int(digits_classifier().predict(digits()[0][:1].astype("float64"))[0])  # type: ignore[attr-defined]


def assert_still_serving(server: ServerProcess) -> None:
    """A good request to each model gets the right answer."""
    r = requests.post(
        f"{server.url}/v1/models/digits:predict", data=json.dumps({"instances": [ROW]}), timeout=10
    )
    assert (r.status_code, r.json()) == (200, {"predictions": [LABEL]})
    body = {"instances": [{"a": [1, 2, 3], "b": [1]}]}
    r = requests.post(f"{server.url}/v1/models/pair:predict", data=json.dumps(body), timeout=10)
    assert (r.status_code, r.json()) == (200, {"predictions": [{"sum": [2.0, 3.0, 4.0], "count": 3}]})


def assert_error(response: requests.Response, status: int, *fragments: str) -> str:
    """The response has ``status`` and a JSON body ``{"error": message}`` holding every fragment."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"], body
    message = body["error"]
    assert isinstance(message, str)
    for fragment in fragments:
        assert fragment in message
    return message


def raw(document: Any) -> bytes:
    return json.dumps(document).encode()


DIGITS = "/v1/models/digits:predict"
PAIR = "/v1/models/pair:predict"
GOOD_PAIR = {"a": [1.0, 2.0, 3.0], "b": [4]}


@pytest.mark.parametrize(
    ("path", "body", "status", "fragments"),
    [
        # the body as a whole
        pytest.param(DIGITS, b'{"instances": [[1, 2]', 400, ["JSON Parse error"], id="malformed-json"),
        pytest.param(DIGITS, b"{'instances': [1]}", 400, ["JSON Parse error"], id="single-quotes"),
        pytest.param(DIGITS, b"", 400, ["JSON Parse error", "empty"], id="empty-body"),
        pytest.param(DIGITS, b"  \n", 400, ["empty"], id="blank-body"),
        pytest.param(DIGITS, raw([ROW]), 400, ["must be an object", "list"], id="body-is-a-list"),
        pytest.param(DIGITS, b'"instances"', 400, ["must be an object", "str"], id="body-is-a-string"),
        pytest.param(DIGITS, b"\xff\xfe{}", 400, ["JSON Parse error"], id="not-utf8"),
        pytest.param(
            DIGITS,
            b'{"instances": [[1e400' + b", 0" * 63 + b"]]}",
            400,
            ["JSON Parse error: Number too big to be stored in double", "1e400"],
            id="number-past-float64",  # rapidjson refuses it; Python's float() made it inf
        ),
        # instances / inputs
        pytest.param(
            DIGITS,
            raw({"instances": [ROW], "inputs": [ROW]}),
            400,
            ["expecting only one of 'inputs' or 'instances' keys to exist"],
            id="both-instances-and-inputs",
        ),
        pytest.param(
            DIGITS,
            raw({"signature_name": "serving_default"}),
            400,
            ["Missing 'inputs' or 'instances' key"],
            id="neither",
        ),
        pytest.param(
            DIGITS, raw({"instances": 5}), 400, ["'instances'", "list/array"], id="instances-a-number"
        ),
        pytest.param(
            DIGITS,
            raw({"instances": {"inputs": ROW}}),
            400,
            ["'instances'", "list/array"],
            id="instances-object",
        ),
        pytest.param(
            DIGITS, raw({"instances": []}), 400, ["No values in 'instances' array"], id="no-instances"
        ),
        pytest.param(DIGITS, raw({"instances": [ROW, ROW[:63]]}), 400, ["'inputs'", "ragged"], id="ragged"),
        pytest.param(
            DIGITS, raw({"inputs": [ROW[:2], [1.0]]}), 400, ["'inputs'", "ragged"], id="ragged-columns"
        ),
        pytest.param(DIGITS, raw({"instances": [ROW[:2], 1.0]}), 400, ["ragged"], id="ragged-depth"),
        # shapes and dtypes against the signature
        pytest.param(
            DIGITS, raw({"instances": [ROW[:63]]}), 400, ["'inputs'", "[-1, 64]", "[1, 63]"], id="63-features"
        ),
        pytest.param(
            DIGITS, raw({"instances": ROW}), 400, ["'inputs'", "[-1, 64]", "[64]"], id="missing-batch"
        ),
        pytest.param(
            DIGITS, raw({"inputs": ROW}), 400, ["'inputs'", "[-1, 64]", "[64]"], id="columnar-no-batch"
        ),
        pytest.param(DIGITS, raw({"instances": [[ROW]]}), 400, ["[-1, 64]", "[1, 1, 64]"], id="too-deep"),
        pytest.param(
            DIGITS, raw({"instances": [["x"] * 64]}), 400, ["'inputs'", "FP64", "BYTES"], id="strings"
        ),
        pytest.param(
            DIGITS,
            raw({"instances": [[*ROW[:63], "7"]]}),
            400,
            ['JSON Value: "7" not of expected type: double', "'inputs'", "FP64"],
            id="mixed-number-string",
        ),
        pytest.param(
            DIGITS, raw({"instances": [[*ROW[:63], None]]}), 400, ["'inputs'", "null"], id="mixed-number-null"
        ),
        pytest.param(
            DIGITS,
            raw({"instances": [[*ROW[:63], {"b64": "AA=="}]]}),
            400,
            ["'inputs'", "different JSON types"],
            id="mixed-number-b64",
        ),
        pytest.param(
            DIGITS,
            raw({"instances": [[*ROW[:63], [1.0]]]}),
            400,
            ["'inputs'", "ragged"],
            id="mixed-number-list",
        ),
        pytest.param(
            DIGITS, raw({"instances": [[True] * 64]}), 400, ["'inputs'", "FP64", "BOOL"], id="booleans"
        ),
        pytest.param(
            DIGITS,
            raw({"instances": [[*ROW[:63], True]]}),
            400,
            ["JSON Value: true not of expected type: double", "'inputs'", "booleans among numbers"],
            id="mixed-number-boolean",
        ),
        pytest.param(
            DIGITS,
            raw({"inputs": [ROW, [False, *ROW[1:]]]}),
            400,
            ["JSON Value: false not of expected type: double"],
            id="mixed-number-boolean-columns",
        ),
        # integers into INT64: NaN / Infinity tokens, fractions, out of range
        pytest.param(
            PAIR, b'{"instances": [{"a": [1, 2, 3], "b": [NaN]}]}', 400, ["'b'", "INT64"], id="nan-into-int64"
        ),
        pytest.param(
            PAIR,
            b'{"instances": [{"a": [1, 2, 3], "b": [Infinity]}]}',
            400,
            ["'b'", "INT64"],
            id="inf-into-int64",
        ),
        pytest.param(
            PAIR,
            b'{"inputs": {"a": [[1, 2, 3]], "b": [[-Infinity]]}}',
            400,
            ["'b'", "INT64"],
            id="minus-inf-into-int64",
        ),
        pytest.param(
            PAIR, raw({"instances": [{"a": [1, 2, 3], "b": [1.5]}]}), 400, ["'b'", "INT64"], id="fraction"
        ),
        pytest.param(
            PAIR,
            raw({"inputs": {"a": [[1, 2, 3], [4, 5, 6]], "b": [[1], [None]]}}),
            400,
            ["'b'", "null"],
            id="null-among-ints",
        ),
        pytest.param(
            PAIR,
            raw({"inputs": {"a": [[1, 2, 3]], "b": [[{"b64": "AA=="}]]}}),
            400,
            ["'b'", "INT64", "BYTES"],
            id="b64-into-int64",
        ),
        pytest.param(
            PAIR,
            raw({"instances": [{"a": [1, 2, 3], "b": [2**63]}]}),
            400,
            ["'b'", "INT64"],
            id="int64-max-plus-1",
        ),
        pytest.param(
            PAIR,
            raw({"instances": [{"a": [1, 2, 3], "b": [-(2**63) - 1]}]}),
            400,
            ["'b'", "64"],
            id="int64-min-1",
        ),
        pytest.param(
            PAIR, raw({"instances": [{"a": [1, 2, 3], "b": [2**64]}]}), 400, ["'b'", "64"], id="2**64"
        ),
        pytest.param(
            PAIR, raw({"instances": [{"a": [1, 2, 3], "b": [10**30]}]}), 400, ["'b'", "64"], id="10**30"
        ),
        # several named inputs
        pytest.param(
            PAIR, raw({"instances": [{"a": [1, 2, 3]}]}), 400, ["instances[0]", "a,b"], id="named-missing-key"
        ),
        pytest.param(
            PAIR,
            raw({"instances": [GOOD_PAIR, {**GOOD_PAIR, "c": [1]}]}),
            400,
            ["instances[1]", "'c'", "a,b"],
            id="named-extra-key",
        ),
        pytest.param(
            PAIR,
            raw({"instances": [GOOD_PAIR, [1, 2, 3]]}),
            400,
            ["named-input objects"],
            id="named-and-plain",
        ),
        pytest.param(
            PAIR,
            raw({"instances": [[1, 2, 3]]}),
            400,
            ["expecting list of objects", "a,b"],
            id="plain-for-two",
        ),
        pytest.param(
            PAIR,
            raw({"inputs": {"a": [[1, 2, 3]]}}),
            400,
            ["Missing named input: b in 'inputs' object"],
            id="col-missing",
        ),
        pytest.param(
            PAIR, raw({"inputs": [[1, 2, 3]]}), 400, ["'inputs' must be an object", "a,b"], id="col-plain"
        ),
        pytest.param(
            PAIR,
            raw({"instances": [{"a": [1, 2], "b": [1]}]}),
            400,
            ["'a'", "[-1, 3]", "[1, 2]"],
            id="named-shape",
        ),
        # signatures
        pytest.param(
            DIGITS,
            raw({"signature_name": "nope", "instances": [ROW]}),
            400,
            ['Serving signature name: "nope" not found'],
            id="unknown-signature",
        ),
        pytest.param(
            DIGITS,
            raw({"signature_name": 5, "instances": [ROW]}),
            400,
            ["'signature_name' key must be a string value."],
            id="signature-not-a-string",
        ),
        pytest.param(
            DIGITS,
            raw({"signature_name": None, "instances": [ROW]}),
            400,
            ["'signature_name' key must be a string value."],
            id="signature-null",
        ),
        pytest.param(
            "/v1/models/digits:regress",
            raw({"examples": [{"inputs": ROW}]}),
            400,
            ["no signature with method tensorflow/serving/regress"],
            id="regress-a-classifier",
        ),
        pytest.param(
            "/v1/models/digits:classify",
            raw({"signature_name": "predict_proba", "examples": [{"inputs": ROW}]}),
            400,
            ["'predict_proba'", "expected tensorflow/serving/classify"],
            id="classify-with-a-predict-signature",
        ),
        pytest.param(
            "/v1/models/digits:classify",
            raw({"instances": [ROW]}),
            400,
            ["When method is classify, key 'examples' is expected and was not found"],
            id="classify-without-examples",
        ),
        pytest.param(
            "/v1/models/digits:classify",
            raw({"examples": []}),
            400,
            ["'examples'", "non-empty"],
            id="no-examples",
        ),
        pytest.param(
            "/v1/models/digits:classify",
            raw({"examples": [ROW]}),
            400,
            ["examples[0] must be an object"],
            id="example-not-an-object",
        ),
        pytest.param(
            "/v1/models/digits:classify",
            raw({"examples": [{"inputs": ROW, "more": [1]}]}),
            400,
            ["examples[0]", "'more'"],
            id="example-extra-feature",
        ),
        # unknown model, version, label
        pytest.param("/v1/models/nope:predict", raw({"instances": [ROW]}), 404, ["nope"], id="unknown-model"),
        pytest.param(
            "/v1/models/digits/versions/7:predict",
            raw({"instances": [ROW]}),
            404,
            ["digits", "7"],
            id="unknown-version",
        ),
        pytest.param(
            "/v1/models/digits/labels/canary:predict",
            raw({"instances": [ROW]}),
            400,  # TF Serving answers an unknown label with INVALID_ARGUMENT
            ["Unrecognized servable version label: canary"],
            id="unknown-label",
        ),
        pytest.param(
            "/v1/models/digits/versions/123456789012345678901:predict",
            raw({"instances": [ROW]}),
            400,
            ["Failed to convert version: 123456789012345678901 to numeric."],
            id="version-overflow",
        ),
        pytest.param(
            "/v1/models/digits/versions/" + "1" * 5000 + ":predict",
            raw({"instances": [ROW]}),
            400,
            ["Failed to convert version: 1111", "(5000 characters) to numeric."],
            id="version-of-5000-digits",
        ),
        pytest.param(
            "/v1/models/digits/versions/%D9%A1:predict",  # ARABIC-INDIC DIGIT ONE
            raw({"instances": [ROW]}),
            400,
            ["Failed to convert version"],
            id="version-in-other-digits",
        ),
    ],
)
def test_bad_post(server: ServerProcess, path: str, body: bytes, status: int, fragments: list[str]) -> None:
    response = requests.post(
        server.url + path, data=body, headers={"content-type": "application/json"}, timeout=10
    )
    assert_error(response, status, *fragments)
    assert_still_serving(server)


@pytest.mark.parametrize(
    ("method", "path", "status", "fragments"),
    [
        ("GET", "/v1/models/nope", 404, ["Could not find any versions of model nope"]),
        ("GET", "/v1/models/digits/versions/7", 404, ["Could not find version 7 of model digits"]),
        ("GET", "/v1/models/nope/metadata", 404, ["nope"]),
        ("GET", "/v1/models/digits/versions/7/metadata", 404, ["digits", "7"]),
        ("GET", "/v1/models/digits/labels/canary/metadata", 400, ["canary"]),
        ("GET", "/v1/models", 400, ["Missing model name in request."]),
        ("GET", "/v1/models/", 400, ["Malformed request: GET /v1/models/"]),
        ("GET", "/v1/models/digits:predict", 400, ["Malformed request: GET /v1/models/digits:predict"]),
        ("PUT", "/v1/models/digits:predict", 400, ["Malformed request: PUT /v1/models/digits:predict"]),
        ("DELETE", "/v1/models/digits", 400, ["Malformed request: DELETE /v1/models/digits"]),
        ("POST", "/v1/models/digits", 400, ["Malformed request: POST /v1/models/digits"]),
        ("POST", "/v1/models/digits/metadata", 400, ["Malformed request: POST /v1/models/digits/metadata"]),
        ("POST", "/v1/models/digits:explain", 400, ["Malformed request"]),
        ("POST", "/v1/models/digits/version/1:predict", 400, ["Malformed request"]),
        ("POST", "/v1/models/digits/versions/1/labels/stable:predict", 400, ["Malformed request"]),
        ("GET", "/v1/models/digits/versions/x", 400, ["Malformed request"]),
        ("GET", "/v1/", 400, ["Malformed request"]),
        ("GET", "/index.html", 404, ["/v1/"]),  # / is the dashboard (test_dashboard.py)
        ("GET", "/models/digits", 404, ["/v1/"]),
        ("POST", "/v2/models/digits/infer", 400, ["'inputs' must be a non-empty list of tensors"]),
        ("GET", "/v3/models/digits", 404, ["/v1/models/ and /v2/"]),
        ("GET", "/v1", 404, ["/v1/"]),
        ("GET", "/v2/models/digits/versions/" + "1" * 5000, 400, ["Failed to convert version"]),
        ("GET", "/v2/models/digits/versions/" + "1" * 5000 + "/stats", 400, ["Failed to convert version"]),
    ],
)
def test_bad_route(server: ServerProcess, method: str, path: str, status: int, fragments: list[str]) -> None:
    body = raw({"instances": [ROW]}) if method in ("POST", "PUT") else None
    assert_error(requests.request(method, server.url + path, data=body, timeout=10), status, *fragments)
    assert_still_serving(server)


def test_nan_and_infinity_are_accepted_for_float_inputs(server: ServerProcess) -> None:
    body = b'{"instances": [[NaN, 1.5, Infinity, -Infinity]]}'
    r = requests.post(f"{server.url}/v1/models/affine:predict", data=body, timeout=10)
    assert r.status_code == 200, r.text
    # written back as TF Serving writes them: NaN / Infinity / -Infinity tokens
    assert r.text.replace(" ", "") == '{"predictions":[[NaN,4.0,Infinity,-Infinity]]}'
    (row,) = json.loads(r.text)["predictions"]
    assert math.isnan(row[0])
    assert row[1:] == [4.0, math.inf, -math.inf]
    assert_still_serving(server)


def test_null_is_not_a_float(server: ServerProcess) -> None:
    r = requests.post(
        f"{server.url}/v1/models/affine:predict", data=b'{"instances": [[null, 1, 2, 3]]}', timeout=10
    )
    assert_error(r, 400, "'x'")
    assert_still_serving(server)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_size_limit_gives_413(server: ServerProcess, chunked: bool) -> None:
    body = raw({"instances": [ROW] * 5})
    assert len(body) > LIMIT
    data: Any = iter([body[:600], body[600:]]) if chunked else body
    r = requests.post(f"{server.url}/v1/models/digits:predict", data=data, timeout=10)
    assert_error(r, 413, f"limit of {LIMIT} bytes", "--max_request_bytes")
    # just under the limit is fine
    small = raw({"instances": [ROW]})
    assert len(small) <= LIMIT
    assert requests.post(f"{server.url}/v1/models/digits:predict", data=small, timeout=10).status_code == 200
    assert_still_serving(server)


def test_a_version_with_leading_zeros_is_read_as_its_number(server: ServerProcess) -> None:
    """As TF Serving's SimpleAtoi reads it, however long the zeros."""
    response = requests.get(f"{server.url}/v1/models/digits/versions/{'0' * 30}1", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["model_version_status"][0]["version"] == "1"
