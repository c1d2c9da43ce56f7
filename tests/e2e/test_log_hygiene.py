"""What the server writes to its log: never a bearer token (the right ones or a wrong one a
client sent), never a request's tensor values, even at ``--log_level=debug`` and on the error
paths (401, 403, 400 bad input, a model that raises)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import requests

from inferd._proto import grpc_service_pb2 as v2
from inferd._proto import grpc_service_pb2_grpc as v2_grpc
from tests.conftest import ServerProcess, launch
from tests.models import write_onnx_affine, write_python_model

ADMIN, API, WRONG = "adm1n-T0KEN-4d7e9", "ap1-T0KEN-93b1c", "wr0ng-T0KEN-55f2a"
TOKENS = (ADMIN, API, WRONG)
MARKER = 7345.1875
"""An input value that shows up in no log line unless a payload is logged (exact in float32)."""
MARKER_TEXT = "tensor-payload-8f3e1c"
"""A string that only a request body carries."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("hygiene")
    write_onnx_affine(repo / "affine" / "1", scale=2.0)
    write_python_model(
        repo / "failing" / "1",
        """
        def load(self):
            pass

        def predict(self, inputs):
            raise RuntimeError("the model gave up")
        """,
    )
    (repo / "failing" / "inferd.toml").write_text("warmup = false\n")
    process = launch(
        repo, str(repo), f"--admin_token={ADMIN}", f"--api_token={API}", "--log_level=debug", wait=False
    )

    def live() -> bool:
        try:
            return requests.get(f"{process.url}/v2/health/live", headers=bearer(API), timeout=2).ok
        except requests.ConnectionError:
            return False

    process.wait_for(live, "the REST port to answer", timeout_s=60)
    yield process
    process.stop()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def infer_body(value: object) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [value, 1, 2, 3]}]}


def rest_calls(url: str) -> None:
    """Authorized and refused REST calls, a bad input and a failing model; checks each status."""
    infer = f"{url}/v2/models/affine/infer"
    assert requests.post(infer, json=infer_body(MARKER), headers=bearer(API), timeout=10).status_code == 200
    assert requests.post(infer, json=infer_body(MARKER), headers=bearer(ADMIN), timeout=10).status_code == 200
    refused = requests.post(infer, json=infer_body(MARKER), headers=bearer(WRONG), timeout=10)
    assert refused.status_code == 401
    assert WRONG not in refused.text
    assert requests.post(infer, json=infer_body(MARKER), timeout=10).status_code == 401
    admin = requests.post(f"{url}/v2/repository/index", json={}, headers=bearer(API), timeout=10)
    assert admin.status_code == 403
    assert API not in admin.text
    bad = requests.post(infer, json=infer_body(MARKER_TEXT), headers=bearer(API), timeout=10)
    assert bad.status_code == 400, bad.text
    tf_bad = requests.post(
        f"{url}/v1/models/affine:predict",
        json={"instances": [[MARKER_TEXT, 1]]},
        headers=bearer(API),
        timeout=10,
    )
    assert tf_bad.status_code == 400, tf_bad.text
    failing = requests.post(
        f"{url}/v1/models/failing:predict",
        json={"instances": [[MARKER, 1.0]]},
        headers=bearer(API),
        timeout=10,
    )
    assert failing.status_code == 500, failing.text


def grpc_calls(target: str) -> None:
    """Authorized and refused gRPC calls, a bad input and a failing model."""
    request = v2.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(
        [MARKER, 1, 2, 3]
    )
    with grpc.insecure_channel(target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(request, metadata=(("authorization", f"Bearer {API}"),), timeout=10)
        for metadata in ((("authorization", f"Bearer {WRONG}"),), ()):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request, metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert WRONG not in (refused.value.details() or "")
        as_client = (("authorization", f"Bearer {API}"),)
        bad = v2.ModelInferRequest(model_name="affine")
        bad.inputs.add(name="x", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(
            MARKER_TEXT.encode()
        )
        failing = v2.ModelInferRequest(model_name="failing")
        failing.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([MARKER, 1])
        for call, code in ((bad, grpc.StatusCode.INVALID_ARGUMENT), (failing, grpc.StatusCode.INTERNAL)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(call, metadata=as_client, timeout=10)
            assert refused.value.code() == code


def test_tokens_and_payloads_never_reach_the_log(server: ServerProcess) -> None:
    rest_calls(server.url)
    grpc_calls(server.grpc_target)
    log = server.log()
    assert "DEBUG" in log, "the server did not log at debug level, so this test would prove nothing"
    assert "the model gave up" in log, "the model failure was not logged"
    for token in TOKENS:
        assert token not in log
    assert MARKER_TEXT not in log
    for spelling in ("7345.1875", "7345.19", "7345.2"):
        assert spelling not in log
