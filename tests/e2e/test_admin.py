"""Admin operations and bearer tokens: the V2 model repository extension over REST (tritonclient.http)
and gRPC (tritonclient.grpc), TF Serving's HandleReloadConfigRequest, ``--admin_token`` and
``--api_token``."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from inferd._proto import model_service_pb2 as ms
from inferd._proto import model_service_pb2_grpc as ms_grpc
from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from tests.conftest import ServerProcess, launch
from tests.models import digits, write_onnx_affine, write_onnx_digits, write_python_model

ADMIN, API = "admin-secret", "api-secret"
AS_ADMIN = {"authorization": f"Bearer {ADMIN}"}
AS_CLIENT = {"authorization": f"Bearer {API}"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("admin")
    write_onnx_digits(repo / "digits" / "1")
    write_onnx_affine(repo / "affine" / "1", scale=2.0)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    process = launch(repo, str(repo), f"--admin_token={ADMIN}")
    yield process
    process.stop()


@pytest.fixture
def http(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture
def grpc_client(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_target)


def index(http: httpclient.InferenceServerClient) -> dict[str, dict[str, str]]:
    return {row["name"]: row for row in http.get_model_repository_index(headers=AS_ADMIN)}


def test_index_lists_every_model_with_its_state(
    server: ServerProcess, http: httpclient.InferenceServerClient
) -> None:
    rows = index(http)
    assert set(rows) == {"digits", "affine", "broken"}
    assert rows["digits"] == {"name": "digits", "version": "1", "state": "READY"}
    assert rows["broken"]["state"] == "UNAVAILABLE"
    assert "model.onnx" in rows["broken"]["reason"]
    only_ready = requests.post(
        f"{server.url}/v2/repository/index", json={"ready": True}, headers=AS_ADMIN, timeout=10
    )
    assert {r["name"] for r in only_ready.json()} == {"digits", "affine"}


def test_unload_then_load_over_rest(server: ServerProcess, http: httpclient.InferenceServerClient) -> None:
    x = digits()[0][:2]
    http.unload_model("affine", headers=AS_ADMIN)
    assert not http.is_model_ready("affine")
    assert index(http)["affine"] == {
        "name": "affine",
        "version": "",
        "state": "UNAVAILABLE",
        "reason": "unloaded",
    }
    assert requests.get(f"{server.url}/v1/models/affine", timeout=5).status_code == 404
    # the other models never stopped serving
    answer = requests.post(
        f"{server.url}/v1/models/digits:predict", json={"instances": x.tolist()}, timeout=10
    )
    assert answer.status_code == 200
    http.load_model("affine", headers=AS_ADMIN)
    assert http.is_model_ready("affine")
    out = requests.post(
        f"{server.url}/v1/models/affine:predict", json={"instances": [[1.0, 2.0, 3.0, 4.0]]}, timeout=10
    )
    assert out.json() == {"predictions": [[2.0, 4.0, 6.0, 8.0]]}


def test_load_picks_up_a_new_version_at_once(repo: Path, http: httpclient.InferenceServerClient) -> None:
    """An explicit load does not wait for the repository scan: the caller vouches the files are in."""
    try:
        write_onnx_affine(repo / "affine" / "2", scale=3.0)
        http.load_model("affine", headers=AS_ADMIN)
        assert http.get_model_metadata("affine")["versions"] == ["2"]
        result = http.infer("affine", [_input(np.ones((1, 4), np.float32))])
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 3.0, np.float32))
    finally:
        shutil.rmtree(repo / "affine" / "2")
        http.load_model("affine", headers=AS_ADMIN)
    assert http.get_model_metadata("affine")["versions"] == ["1"]


def _input(x: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_load_failures_are_clear(http: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as broken:
        http.load_model("broken", headers=AS_ADMIN)
    assert broken.value.status() == "400"
    assert "failed to load model 'broken'" in broken.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        http.load_model("nosuch", headers=AS_ADMIN)
    assert unknown.value.status() == "404"
    assert unknown.value.message().startswith("failed to load 'nosuch', failed to poll from model repository")
    assert "'nosuch' is not in the model repository" in unknown.value.message()
    with pytest.raises(InferenceServerException) as override:
        http.load_model("digits", headers=AS_ADMIN, config='{"max_batch_size": 8, "input": []}')
    assert override.value.status() == "400"
    assert "config keys ['input'] are not supported" in override.value.message()
    assert http.is_model_ready("digits")


def test_load_finds_a_model_folder_added_since_the_last_scan(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """As Triton's load polls the repository: also without polling (a scan only at start)."""
    write_onnx_affine(tmp_path / "repo" / "a" / "1", scale=2.0)
    server = start_server(str(tmp_path / "repo"), f"--admin_token={ADMIN}")
    write_onnx_affine(tmp_path / "repo" / "b" / "1", scale=3.0)
    answer = requests.post(f"{server.url}/v2/repository/models/b/load", headers=AS_ADMIN, timeout=30)
    assert answer.json() == {"name": "b", "load": True}
    assert server.status("b") == {"1": "AVAILABLE"}


def test_load_tries_a_failed_version_again(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """What made a load fail may be gone (memory, a device, a store) while its files are the same."""
    busy = tmp_path / "busy"
    busy.touch()
    write_python_model(
        tmp_path / "repo" / "m" / "1",
        f"""
        def load(self):
            import os

            if os.path.exists({str(busy)!r}):
                raise RuntimeError("the device is busy")

        def predict(self, inputs):
            return {{"y": inputs["x"]}}
        """,
    )
    server = start_server(str(tmp_path / "repo"), f"--admin_token={ADMIN}")
    assert server.status("m") == {"1": "END"}
    busy.unlink()
    answer = requests.post(f"{server.url}/v2/repository/models/m/load", headers=AS_ADMIN, timeout=30)
    assert answer.json() == {"name": "m", "load": True}
    assert server.status("m") == {"1": "AVAILABLE"}


@pytest.mark.parametrize(
    ("headers", "status", "fragment"),
    [
        ({}, 401, "needs an 'Authorization: Bearer <token>' header"),
        ({"Authorization": "Bearer wrong"}, 401, "not valid"),
        ({"Authorization": f"Basic {ADMIN}"}, 401, "needs an 'Authorization: Bearer <token>' header"),
    ],
)
def test_admin_routes_need_the_admin_token(
    server: ServerProcess, headers: dict[str, str], status: int, fragment: str
) -> None:
    for path in ("/v2/repository/index", "/v2/repository/models/digits/unload"):
        answer = requests.post(f"{server.url}{path}", headers=headers, timeout=10)
        assert answer.status_code == status
        assert fragment in answer.json()["error"]
        assert answer.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{server.url}/v2/models/digits/ready", timeout=5).status_code == 200


def test_repository_over_grpc(grpc_client: grpcclient.InferenceServerClient) -> None:
    rows = grpc_client.get_model_repository_index(headers=AS_ADMIN, as_json=True)["models"]
    assert {"name": "digits", "version": "1", "state": "READY"} in rows
    grpc_client.unload_model("affine", headers=AS_ADMIN)
    assert not grpc_client.is_model_ready("affine")
    grpc_client.load_model("affine", headers=AS_ADMIN)
    assert grpc_client.is_model_ready("affine")
    with pytest.raises(InferenceServerException) as missing:
        grpc_client.unload_model("affine")
    assert missing.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as broken:
        grpc_client.load_model("broken", headers=AS_ADMIN)
    assert broken.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "failed to load model 'broken'" in broken.value.message()


def test_model_config_and_extensions_over_grpc(grpc_client: grpcclient.InferenceServerClient) -> None:
    config = grpc_client.get_model_config("digits", as_json=True)["config"]
    assert config["name"] == "digits"
    assert config["input"] == [{"name": "X", "data_type": "TYPE_FP32", "dims": ["-1", "64"]}]
    extensions = grpc_client.get_server_metadata(as_json=True)["extensions"]
    assert {"model_repository", "model_configuration"} <= set(extensions)


def config_text(repo: Path, *names: str) -> ms.ReloadConfigRequest:
    request = ms.ReloadConfigRequest()
    for name in names:
        request.config.model_config_list.config.add(name=name, base_path=str(repo / name))
    return request


def test_reload_config_answers_once_a_new_model_is_loaded(
    repo: Path, start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A model the config adds is loaded before the answer, not after a second scan a poll
    period later finds its files unchanged."""
    server = start_server(str(repo), f"--admin_token={ADMIN}", "--file_system_poll_wait_seconds=2")
    write_onnx_affine(tmp_path / "added" / "1", scale=3.0)
    request = config_text(repo, "digits")
    request.config.model_config_list.config.add(name="added", base_path=str(tmp_path / "added"))
    with grpc.insecure_channel(server.grpc_target) as channel:
        ms_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            request, metadata=(("authorization", f"Bearer {ADMIN}"),), timeout=30
        )
    assert server.status("added") == {"1": "AVAILABLE"}
    answer = requests.post(
        f"{server.url}/v1/models/added:predict", json={"instances": [[1.0, 2.0, 3.0, 4.0]]}, timeout=10
    )
    assert answer.json() == {"predictions": [[3.0, 6.0, 9.0, 12.0]]}


def test_reload_config_leaves_a_model_that_stays_put_to_the_scans(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Changing only a model's labels does not vouch for a version being written meanwhile: it
    waits for the scans to find its files unchanged, as without the reload."""
    repo = tmp_path / "models"
    write_onnx_affine(repo / "m" / "1", scale=2.0)
    server = start_server(str(repo), f"--admin_token={ADMIN}", "--file_system_poll_wait_seconds=4")
    # As if still being copied. (Were a periodic scan to fall in the few ms before the reload's,
    # version 2 would be stable by right; one in 4 s makes that rare.)
    write_onnx_affine(repo / "m" / "2", scale=3.0)
    request = ms.ReloadConfigRequest()
    config = request.config.model_config_list.config.add(name="m", base_path=str(repo / "m"))
    config.version_labels["stable"] = 1
    with grpc.insecure_channel(server.grpc_target) as channel:
        ms_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            request, metadata=(("authorization", f"Bearer {ADMIN}"),), timeout=30
        )
    assert server.status("m") == {"1": "AVAILABLE"}


def test_reload_config_replaces_the_served_models(repo: Path, server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = ms_grpc.ModelServiceStub(channel)
        metadata = (("authorization", f"Bearer {ADMIN}"),)
        with pytest.raises(grpc.RpcError) as refused:
            stub.HandleReloadConfigRequest(config_text(repo, "digits"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        try:
            stub.HandleReloadConfigRequest(config_text(repo, "digits"), metadata=metadata, timeout=30)
            assert server.status("affine") == {}
            assert server.status("digits") == {"1": "AVAILABLE"}
            with pytest.raises(grpc.RpcError) as failed:
                stub.HandleReloadConfigRequest(
                    config_text(repo, "digits", "broken"), metadata=metadata, timeout=30
                )
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no version of ['broken'] could be loaded" in (failed.value.details() or "")
            assert server.status("broken") == {"1": "END"}
            assert server.status("digits") == {"1": "AVAILABLE"}
        finally:
            with pytest.raises(grpc.RpcError):  # 'broken' still fails; the rest is back in force
                stub.HandleReloadConfigRequest(
                    config_text(repo, "digits", "affine", "broken"), metadata=metadata, timeout=30
                )
    assert server.status("affine") == {"1": "AVAILABLE"}


def test_reload_config_without_a_model_config_list_changes_nothing(server: ServerProcess) -> None:
    """As in TF Serving: a request whose config is unset (a client that did not fill it in) is
    INVALID_ARGUMENT; it read as a config of no models, and unloaded every model."""
    with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as refused:
        ms_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            ms.ReloadConfigRequest(), metadata=(("authorization", f"Bearer {ADMIN}"),), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Only ModelConfigList is currently supported" in (refused.value.details() or "")
    assert server.status("digits") == {"1": "AVAILABLE"}


def test_admin_calls_are_refused_without_an_admin_token(
    start_server: Callable[..., ServerProcess], repo: Path
) -> None:
    server = start_server(str(repo))
    answer = requests.post(f"{server.url}/v2/repository/models/digits/unload", headers=AS_ADMIN, timeout=10)
    assert answer.status_code == 403
    assert "admin operations are disabled; start inferd with --admin_token" in answer.json()["error"]
    with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as refused:
        ms_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            config_text(repo, "digits"), metadata=(("authorization", f"Bearer {ADMIN}"),), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert server.status("digits") == {"1": "AVAILABLE"}


def test_api_token_guards_every_call(start_server: Callable[..., ServerProcess], repo: Path) -> None:
    server = start_server(str(repo), f"--api_token={API}", f"--admin_token={ADMIN}")
    body = {"instances": digits()[0][:1].tolist()}
    predict = f"{server.url}/v1/models/digits:predict"
    refused = requests.post(predict, json=body, timeout=10)
    assert refused.status_code == 401
    assert "Bearer" in refused.json()["error"]
    for path in ("/v2/health/ready", "/metrics", "/v1/models/digits"):
        assert requests.get(f"{server.url}{path}", timeout=10).status_code == 401
    assert requests.post(predict, json=body, headers=AS_CLIENT, timeout=10).status_code == 200
    assert requests.post(predict, json=body, headers=AS_ADMIN, timeout=10).status_code == 200
    as_client = requests.post(f"{server.url}/v2/repository/index", headers=AS_CLIENT, timeout=10)
    assert as_client.status_code == 403
    assert "the API token does not allow admin operations" in as_client.json()["error"]

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = ps_grpc.PredictionServiceStub(channel)
        request = ps.PredictRequest(model_spec=ps.ModelSpec(name="digits"))
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.GetModelMetadata(
                ps.GetModelMetadataRequest(model_spec=request.model_spec, metadata_field=["signature_def"]),
                timeout=10,
            )
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = grpcclient.InferenceServerClient(server.grpc_target)
    assert client.is_model_ready("digits", headers=AS_CLIENT)
    with pytest.raises(InferenceServerException) as no_token:
        client.is_model_ready("digits")
    assert no_token.value.status() == "StatusCode.UNAUTHENTICATED"
