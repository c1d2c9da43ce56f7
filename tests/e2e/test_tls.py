"""TLS on both ports: ``--tls_cert``/``--tls_key`` (files) and TF Serving's ``--ssl_config_file``
(PEM text), mutual TLS with ``--tls_client_verify`` / ``client_verify``, and the refusals: plain
HTTP and plain gRPC on a TLS port, clients without a certificate or with one from another CA,
and bad TLS settings at start. Certificates are made at test time (tests/pki.py)."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from inferd._proto import grpc_service_pb2 as v2
from inferd._proto import grpc_service_pb2_grpc as v2_grpc
from tests.conftest import ServerProcess, free_port, launch
from tests.models import write_onnx_affine, write_python_model
from tests.pki import Authority, Issued

INFER = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Issued
    client: Issued
    stranger: Issued
    """A client certificate from another CA."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "inferd-test-ca")
    other = Authority(folder / "other", "someone-else-ca")
    return Pki(
        ca.cert,
        ca.issue("server", server=True),
        ca.issue("client", server=False),
        other.issue("stranger", server=False),
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("tls-models")
    write_onnx_affine(repo / "affine" / "1", scale=2.0)
    return repo


def start_tls(log_dir: Path, repo: Path, pki: Pki, *args: str, client: Issued | None = None) -> ServerProcess:
    """Start inferd with TLS ``args`` and wait until it answers over https."""
    server = launch(log_dir, str(repo), *args, wait=False)
    server.url = server.url.replace("http://", "https://")
    cert = (str(client.cert), str(client.key)) if client else None

    def ready() -> bool:
        try:
            return requests.get(f"{server.url}/v2/health/ready", verify=pki.ca, cert=cert, timeout=2).ok
        except requests.ConnectionError:
            return False

    try:
        server.wait_for(ready, "the HTTPS port to answer", timeout_s=60)
    except BaseException:
        server.stop()
        raise
    return server


def ssl_config_text(pki: Pki, client_verify: bool) -> str:
    """An SSLConfig as TF Serving's users write it: PEM text in adjacent quoted lines."""

    def field(name: str, path: Path) -> str:
        lines = path.read_text().splitlines()
        return f"{name}: " + "\n  ".join(f'"{line}\\n"' for line in lines)

    parts = [
        field("server_key", pki.server.key),
        field("server_cert", pki.server.cert),
        field("custom_ca", pki.ca),
        f"client_verify: {str(client_verify).lower()}",
    ]
    return "\n".join(parts) + "\n"


def grpc_channel(server: ServerProcess, pki: Pki, client: Issued | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.secure_channel(server.grpc_target, credentials)


def v2_infer(channel: grpc.Channel) -> list[float]:
    request = v2.ModelInferRequest(model_name="affine")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    reply = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    return list(np.frombuffer(reply.raw_output_contents[0], dtype="<f4"))


def assert_grpc_refused(channel: grpc.Channel) -> None:
    with channel, pytest.raises(grpc.RpcError) as refused:
        v2_grpc.GRPCInferenceServiceStub(channel).ServerLive(v2.ServerLiveRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- server-only TLS, from files


@pytest.fixture(scope="module")
def tls_server(repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_tls(
        tmp_path_factory.mktemp("tls-log"),
        repo,
        pki,
        f"--tls_cert={pki.server.cert}",
        f"--tls_key={pki.server.key}",
    )
    yield server
    server.stop()


def test_rest_over_https(tls_server: ServerProcess, pki: Pki) -> None:
    v2_reply = requests.post(
        f"{tls_server.url}/v2/models/affine/infer", json=INFER, verify=pki.ca, timeout=10
    )
    assert v2_reply.status_code == 200, v2_reply.text
    assert v2_reply.json()["outputs"][0]["data"] == [2, 4, 6, 8]
    tf_reply = requests.post(
        f"{tls_server.url}/v1/models/affine:predict",
        json={"instances": [[1, 2, 3, 4]]},
        verify=pki.ca,
        timeout=10,
    )
    assert tf_reply.json() == {"predictions": [[2, 4, 6, 8]]}
    assert "https://" in tls_server.log()


def test_server_certificate_is_checked_by_clients(tls_server: ServerProcess) -> None:
    """The certificate is the test CA's, so a client trusting only the system CAs refuses it."""
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{tls_server.url}/v2/health/live", timeout=5)


def test_plain_http_is_refused(tls_server: ServerProcess) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(tls_server.url.replace("https://", "http://") + "/v2/health/live", timeout=5)


def test_grpc_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    with grpc_channel(tls_server, pki, client=None) as channel:
        assert v2_infer(channel) == [2, 4, 6, 8]


def test_plain_grpc_is_refused(tls_server: ServerProcess) -> None:
    assert_grpc_refused(grpc.insecure_channel(tls_server.grpc_target))


def test_silent_connections_are_closed_by_the_header_timeout(repo: Path, pki: Pki, tmp_path: Path) -> None:
    """On each port, one client never starts its TLS handshake, another finishes it and sends
    nothing more: all are closed once ``--header_timeout_s`` passes (gRPC's own defaults: two
    minutes and one; the REST port's event loop waited 60 s for a handshake)."""
    files = (f"--tls_cert={pki.server.cert}", f"--tls_key={pki.server.key}")
    server = start_tls(tmp_path, repo, pki, *files, "--header_timeout_s=1")
    host, port = server.grpc_target.rsplit(":", 1)
    rest_port = int(server.url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, int(port)), timeout=20)
    shook = socket.create_connection((host, int(port)), timeout=20)
    shook = context.wrap_socket(shook, server_hostname="localhost")
    rest_raw = socket.create_connection((host, rest_port), timeout=20)
    rest_shook = ssl.create_default_context(cafile=str(pki.ca)).wrap_socket(
        socket.create_connection((host, rest_port), timeout=20), server_hostname="localhost"
    )
    try:
        started = time.monotonic()
        for sock in (raw, shook, rest_raw, rest_shook):
            try:
                while sock.recv(65536):  # the server's settings, its GOAWAY, then the close
                    pass
            except TimeoutError:
                pytest.fail(f"the server held a silent connection for {time.monotonic() - started:.0f} s")
            except (ConnectionResetError, ssl.SSLError):
                pass
        assert time.monotonic() - started < 10
        with grpc_channel(server, pki, client=None) as channel:
            assert v2_infer(channel) == [2, 4, 6, 8]
        assert requests.get(f"{server.url}/v2/health/live", verify=pki.ca, timeout=5).ok
    finally:
        for sock in (raw, shook, rest_raw, rest_shook):
            sock.close()
        server.stop()


def test_tritonclient_http_with_ssl(tls_server: ServerProcess, pki: Pki) -> None:
    client = httpclient.InferenceServerClient(
        tls_server.url.removeprefix("https://"), ssl=True, ssl_options={"ca_certs": str(pki.ca)}
    )
    assert client.is_server_live()
    x = httpclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32), binary_data=True)
    result = client.infer("affine", [x])
    np.testing.assert_array_equal(result.as_numpy("y"), [[2, 4, 6, 8]])


def test_tritonclient_grpc_with_ssl(tls_server: ServerProcess, pki: Pki) -> None:
    client = grpcclient.InferenceServerClient(tls_server.grpc_target, ssl=True, root_certificates=str(pki.ca))
    assert client.is_server_live()
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
    result = client.infer("affine", [x])
    np.testing.assert_array_equal(result.as_numpy("y"), [[2, 4, 6, 8]])


def bench_over_tls(target: str, protocol: str, *tls_args: str) -> dict[str, Any]:
    """``inferd bench`` for a second, closed loop, 2 connections; its one step."""
    argv = [sys.executable, "-m", "inferd", "bench", target, "--model=affine", f"--protocol={protocol}"]
    argv += ["--concurrency=2", "--duration=1", "--warmup=0", "--json=-", *tls_args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    step: dict[str, Any] = json.loads(done.stdout)["steps"][0]
    return step


@pytest.mark.parametrize("protocol", ["v2", "v2-binary", "rest", "grpc", "v2-grpc"])
def test_inferd_bench_over_tls(tls_server: ServerProcess, pki: Pki, protocol: str) -> None:
    target = tls_server.url if "grpc" not in protocol else tls_server.grpc_target
    step = bench_over_tls(target, protocol, f"--tls-ca={pki.ca}")
    assert step["requests"] > 0
    assert step["errors"] == {}


# ---------------------------------------------------------------- mutual TLS, from either source


@pytest.fixture(scope="module", params=["ssl_config_file", "tls_flags", "ca_bundle"])
def mtls_server(
    request: pytest.FixtureRequest, repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("mtls")
    if request.param == "ssl_config_file":
        config = folder / "ssl_config.txt"
        config.write_text(ssl_config_text(pki, client_verify=True))
        args = [f"--ssl_config_file={config}"]
    else:
        ca = pki.ca
        if request.param == "ca_bundle":  # as curl's cacert.pem: UTF-8 names in comments
            ca = folder / "bundle.pem"
            ca.write_text(
                "## NetLock Arany (Class Gold) Főtanúsítvány\n" + pki.ca.read_text(), encoding="utf-8"
            )
        args = [
            f"--tls_cert={pki.server.cert}",
            f"--tls_key={pki.server.key}",
            f"--tls_ca={ca}",
            "--tls_client_verify",
        ]
    server = start_tls(folder, repo, pki, *args, client=pki.client)
    yield server
    server.stop()


def test_mtls_rest_needs_a_client_certificate_from_the_ca(mtls_server: ServerProcess, pki: Pki) -> None:
    url = f"{mtls_server.url}/v2/models/affine/infer"
    accepted = requests.post(
        url, json=INFER, verify=pki.ca, cert=(str(pki.client.cert), str(pki.client.key)), timeout=10
    )
    assert accepted.json()["outputs"][0]["data"] == [2, 4, 6, 8]
    with pytest.raises(requests.ConnectionError):
        requests.post(url, json=INFER, verify=pki.ca, timeout=10)
    stranger = (str(pki.stranger.cert), str(pki.stranger.key))
    with pytest.raises(requests.ConnectionError):
        requests.post(url, json=INFER, verify=pki.ca, cert=stranger, timeout=10)


def test_mtls_grpc_needs_a_client_certificate_from_the_ca(mtls_server: ServerProcess, pki: Pki) -> None:
    with grpc_channel(mtls_server, pki, pki.client) as channel:
        assert v2_infer(channel) == [2, 4, 6, 8]
    assert_grpc_refused(grpc_channel(mtls_server, pki, client=None))
    assert_grpc_refused(grpc_channel(mtls_server, pki, pki.stranger))


def test_inferd_bench_with_a_client_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    client = (f"--tls-ca={pki.ca}", f"--tls-cert={pki.client.cert}", f"--tls-key={pki.client.key}")
    for protocol, target in (("v2", mtls_server.url), ("v2-grpc", mtls_server.grpc_target)):
        step = bench_over_tls(target, protocol, *client)
        assert step["requests"] > 0
        assert step["errors"] == {}


# ---------------------------------------------------------------- shutdown over TLS


def test_shutdown_finishes_in_flight_answers_and_waits_for_no_idle_client(pki: Pki, tmp_path: Path) -> None:
    """SIGTERM with a slow request in flight (its large answer arrives whole) and an idle
    kept-alive TLS client that never closes: the server still exits promptly (closing a TLS
    connection would otherwise wait 30 s for that client's close_notify)."""
    repo = tmp_path / "models"
    write_python_model(
        repo / "slow" / "1",
        """
        def load(self):
            pass

        def predict(self, inputs):
            import time
            time.sleep(1.5)
            return {"y": np.repeat(inputs["x"], 250_000, axis=0)}
        """,
    )
    (repo / "slow" / "inferd.toml").write_text("warmup = false\n")
    server = start_tls(tmp_path, repo, pki, f"--tls_cert={pki.server.cert}", f"--tls_key={pki.server.key}")
    try:
        host, port = server.url.removeprefix("https://").split(":")
        context = ssl.create_default_context(cafile=pki.ca)
        with context.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host) as idle:
            idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: inferd\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")
            with ThreadPoolExecutor(1) as pool:
                body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
                slow = pool.submit(
                    requests.post, f"{server.url}/v2/models/slow/infer", json=body, verify=pki.ca, timeout=30
                )
                server.wait_for(
                    lambda: (
                        "inferd_in_flight_requests 1"
                        in requests.get(f"{server.url}/metrics", verify=pki.ca, timeout=5).text
                    ),
                    "the slow request to be in flight",
                )
                stopped_at = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                answer = slow.result()
                assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
    assert time.monotonic() - stopped_at < 15, "shutdown waited for the idle client's close_notify"
    assert answer.status_code == 200
    assert len(answer.json()["outputs"][0]["data"]) == 500_000


# ---------------------------------------------------------------- bad settings stop the server


def refused_start(repo: Path, *args: str) -> str:
    """Start inferd with bad TLS ``args``; it must exit with status 2 before serving. Its stderr."""
    argv = [sys.executable, "-m", "inferd", "serve", str(repo), "--host=127.0.0.1"]
    argv += [f"--rest_api_port={free_port()}", f"--port={free_port()}", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    return done.stderr


def test_bad_tls_settings_stop_the_server_with_a_clear_message(repo: Path, pki: Pki, tmp_path: Path) -> None:
    key_text = pki.server.key.read_text().splitlines()[1]
    assert "needs both --tls_cert and --tls_key" in refused_start(repo, f"--tls_cert={pki.server.cert}")
    no_ca = refused_start(
        repo, f"--tls_cert={pki.server.cert}", f"--tls_key={pki.server.key}", "--tls_client_verify"
    )
    assert "needs the CA" in no_ca
    mismatch = refused_start(repo, f"--tls_cert={pki.server.cert}", f"--tls_key={pki.client.key}")
    assert "cannot use the server certificate and key" in mismatch
    assert key_text not in mismatch
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    encrypted_key = tmp_path / "encrypted.key"
    encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    encrypted = refused_start(repo, f"--tls_cert={pki.server.cert}", f"--tls_key={encrypted_key}")
    assert "the server key is encrypted" in encrypted
    der_ca = tmp_path / "ca.der"
    der_ca.write_bytes(
        x509.load_pem_x509_certificate(pki.ca.read_bytes()).public_bytes(serialization.Encoding.DER)
    )
    der = refused_start(
        repo, f"--tls_cert={pki.server.cert}", f"--tls_key={pki.server.key}", f"--tls_ca={der_ca}"
    )
    assert "the client CA is not valid PEM" in der
    missing = refused_start(repo, f"--tls_cert={pki.server.cert}", f"--tls_key={tmp_path / 'absent.key'}")
    assert "--tls_key" in missing
    assert "absent.key" in missing
    config = tmp_path / "ssl.txt"
    config.write_text('server_key: "x"\nserver_cert: "y"\nclient_auth: true\n')
    assert "client_auth" in refused_start(repo, f"--ssl_config_file={config}")
    config.write_text(f"server_key: {key_text}\n")
    unquoted = refused_start(repo, f"--ssl_config_file={config}")
    assert "line 1, column 13: syntax error" in unquoted
    assert key_text not in unquoted
    config.write_text(ssl_config_text(pki, client_verify=False))
    both = refused_start(repo, f"--ssl_config_file={config}", f"--tls_cert={pki.server.cert}")
    assert "either --ssl_config_file or --tls_cert" in both
