"""``inferd ray serve`` on a real two-node Ray cluster started on this machine: the replicas answer
as ``inferd serve`` does over both REST APIs and both gRPC APIs (with the ``tensorflow-serving-api``
stubs and ``tritonclient.grpc``), unload idle versions as it does, and version swaps, scaling and a
killed replica lose no request."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.utils import InferenceServerException

from inferd.ray.cold_start import WAIT_ENV
from tests.conftest import ServerProcess, free_port, launch
from tests.e2e.test_batch_features import requests_table, write_store
from tests.e2e.test_batch_features import write_model as write_features_model
from tests.e2e.test_batching import ROW_AWARE_SIGNATURE, slow_model, write_model
from tests.models import write_onnx_affine, write_python_model
from tests.ray_cluster import LocalCluster, start_cluster
from tests.s3_server import S3Server

pytestmark = pytest.mark.timeout(600)

ROW = [1.0, 2.0, 3.0, 4.0]
ADMIN_TOKEN = secrets.token_hex(8)
"""The admin token of the tests that deploy with one: the same flags redeploy no replica."""
COLD_WAIT_S = 3
"""The cluster's bound on a prediction's wait while no replica runs (``INFERD_SCALE_FROM_ZERO_WAIT_S``)."""


def _ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


@dataclass
class Cluster:
    """A head and a worker node started with ``ray start`` (``tests.ray_cluster``); ``env`` is
    what both run with, credentials for the S3 server ``s3`` included."""

    address: str
    env: dict[str, str]
    log_dir: Path
    local: LocalCluster
    s3: S3Server

    def inferd(self, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "inferd", "ray", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def status(self) -> dict[str, object]:
        done = self.inferd("status", f"--address={self.address}")
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("ray")
    s3 = S3Server(tmp_path_factory.mktemp("s3"))
    s3.start()
    try:
        local = start_cluster(log_dir, extra_env={WAIT_ENV: str(COLD_WAIT_S), **s3.env()})
        try:
            yield Cluster(local.address, local.env, log_dir, local, s3)
        finally:
            local.stop()
    finally:
        s3.stop()


@dataclass
class Deployment:
    cluster: Cluster
    repository: Path
    url: str
    grpc_target: str
    flags: list[str] = field(default_factory=list)

    def deploy(self, *extra: str) -> None:
        done = self.cluster.inferd("serve", str(self.repository), *self.flags, *extra, "--detach")
        assert done.returncode == 0, done.stderr[-4000:]

    def replicas_running(self) -> int:
        states = self.cluster.status()["replica_states"]
        assert isinstance(states, dict)
        return int(states.get("RUNNING", 0)) if set(states) == {"RUNNING"} else -1


@pytest.fixture(scope="module")
def deployed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    repository = tmp_path_factory.mktemp("repo")
    write_onnx_affine(repository / "affine" / "1", 2.0)
    # Scaling from the repository's own inferd.toml; the tests' flags add to it.
    (repository / "inferd.toml").write_text("[ray]\ndownscale_delay_s = 1\n")
    port, grpc_port = _ports(2)
    flags = [
        f"--address={cluster.address}",
        "--host=127.0.0.1",
        f"--rest_api_port={port}",
        f"--port={grpc_port}",
        "--file_system_poll_wait_seconds=0.3",
    ]
    deployment = Deployment(cluster, repository, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", flags)
    deployment.deploy("--num_replicas=1")
    return deployment


class Traffic:
    """A client thread posting predictions until stopped; counts answers by outcome."""

    def __init__(self, url: str, model: str = "affine", row: list[float] = ROW) -> None:
        self._url = f"{url}/v1/models/{model}:predict"
        self._row = row
        self._stop = threading.Event()
        self.answers: list[tuple[int, bytes]] = []
        self.spans: list[tuple[float, float]] = []
        """Each answer's start and end (``time.monotonic()``), in the order of ``answers``."""
        self.failures: list[str] = []
        self.cut: list[tuple[float, float, requests.RequestException]] = []
        """Each failed request's start and end (``time.monotonic()``) and error."""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = session.post(self._url, json={"instances": [self._row]}, timeout=20)
                    self.answers.append((response.status_code, response.content))
                    self.spans.append((started, time.monotonic()))
                except requests.RequestException as exc:
                    ended = time.monotonic()
                    self.failures.append(f"{exc!r}, sent at {started:.3f}, failed at {ended:.3f}")
                    self.cut.append((started, ended, exc))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "a request hung"


def _death(pid: int, timeout_s: float = 30) -> float:
    """When the signalled process ``pid`` had finished exiting (gone, or a zombie: its memory and
    sockets released), polled every millisecond; monotonic seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return time.monotonic()
        if state in ("Z", "X"):
            return time.monotonic()
        time.sleep(0.001)
    raise AssertionError(f"process {pid} still running {timeout_s} s after SIGKILL")


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _same_requests(url: str) -> list[tuple[int, bytes]]:
    """The answers to one request of each kind over both REST APIs, in order."""
    v2 = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": ROW + ROW}]}
    calls = [
        ("POST", "/v1/models/affine:predict", {"instances": [ROW, ROW]}),
        ("POST", "/v1/models/affine/versions/1:predict", {"inputs": {"x": [ROW]}}),
        ("POST", "/v1/models/affine:predict", {"instances": [[1.0, 2.0]]}),
        ("GET", "/v1/models/affine", None),
        ("GET", "/v1/models/affine/metadata", None),
        ("POST", "/v2/models/affine/infer", v2),
        ("GET", "/v2/models/affine", None),
        ("GET", "/v2/models/nope", None),
        ("GET", "/v2/health/ready", None),
    ]
    answers = []
    for method, path, body in calls:
        response = requests.request(method, f"{url}{path}", json=body, timeout=30)
        answers.append((response.status_code, response.content))
    return answers


def test_rest_answers_are_the_bytes_inferd_serve_gives(deployed: Deployment, tmp_path: Path) -> None:
    alone: ServerProcess = launch(tmp_path, str(deployed.repository))
    try:
        expected = _same_requests(alone.url)
    finally:
        alone.stop()
    assert _same_requests(deployed.url) == expected
    assert expected[0][0] == 200
    assert expected[2][0] == 400


def _tf_tensor(rows: list[list[float]]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "affine"
    tensor = request.inputs["x"]
    tensor.dtype = 1  # DT_FLOAT
    tensor.tensor_shape.dim.add(size=len(rows))
    tensor.tensor_shape.dim.add(size=len(rows[0]))
    tensor.float_val.extend(v for row in rows for v in row)
    return request


def _same_grpc_calls(target: str) -> list[tuple[str, str, bytes, str | None]]:
    """The answers to health, TF Serving and V2 gRPC calls, each as (status code, details, reply bytes,
    the version named in the trailing metadata)."""
    unknown = _tf_tensor([ROW])
    unknown.model_spec.name = "nope"
    bad_width = _tf_tensor([[1.0, 2.0]])
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "affine"
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "affine"
    with grpc.insecure_channel(target) as channel:
        predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        calls = [
            (health.Check, health_pb2.HealthCheckRequest()),
            (health.Check, health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService")),
            (health.Check, health_pb2.HealthCheckRequest(service="nope")),
            (predictions.Predict, _tf_tensor([ROW, ROW])),
            (predictions.Predict, unknown),
            (predictions.Predict, bad_width),
            (predictions.GetModelMetadata, metadata),
            (models.GetModelStatus, status),
            (models.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest()),
        ]
        answers = []
        for method, request in calls:
            try:
                reply, call = method.with_call(request, timeout=30)
                version = dict(call.trailing_metadata() or ()).get("inferd-model-version")
                answers.append(("OK", "", reply.SerializeToString(deterministic=True), version))
            except grpc.RpcError as error:
                answers.append((error.code().name, error.details() or "", b"", None))
    return answers


def _triton_calls(target: str) -> list[object]:
    """What ``tritonclient.grpc`` reads from the V2 service: readiness, metadata, an inference
    and the error for an unknown model."""
    client = triton.InferenceServerClient(target)
    try:
        x = triton.InferInput("x", [2, 4], "FP32")
        x.set_data_from_numpy(np.array([ROW, ROW], dtype=np.float32))
        result = client.infer("affine", [x], client_timeout=30)
        try:
            client.get_model_metadata("nope", client_timeout=30)
            missing = ""
        except InferenceServerException as exc:
            missing = f"{exc.status()} {exc.message()}"
        return [
            client.is_server_live(),
            client.is_server_ready(),
            client.is_model_ready("affine"),
            client.get_server_metadata(as_json=True)["name"],
            client.get_model_metadata("affine", as_json=True),
            result.as_numpy("y").tolist(),
            missing,
        ]
    finally:
        client.close()


def test_grpc_answers_are_the_ones_inferd_serve_gives(deployed: Deployment, tmp_path: Path) -> None:
    alone: ServerProcess = launch(tmp_path, str(deployed.repository))
    try:
        expected, expected_v2 = _same_grpc_calls(alone.grpc_target), _triton_calls(alone.grpc_target)
    finally:
        alone.stop()
    assert _same_grpc_calls(deployed.grpc_target) == expected
    assert _triton_calls(deployed.grpc_target) == expected_v2
    assert [code for code, *_ in expected] == [
        "OK",  # health, the whole server
        "OK",  # health, one service
        "NOT_FOUND",  # health, a service inferd does not have
        "OK",
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        "OK",
        "OK",
        "PERMISSION_DENIED",
    ]
    assert expected[0][2] == b"\x08\x01"  # SERVING
    assert expected[3][3] == "1"
    assert expected_v2[5] == [[2.0, 4.0, 6.0, 8.0]] * 2


IDLE_TOML = "[residency]\nidle_unload_s = 1\n"


def test_replicas_unload_a_version_idle_past_its_idle_unload_s(deployed: Deployment) -> None:
    write_onnx_affine(deployed.repository / "idle" / "1", 5.0)
    (deployed.repository / "idle" / "inferd.toml").write_text(IDLE_TOML)
    url = f"{deployed.url}/v1/models/idle"

    def answers() -> bool:
        response = requests.post(f"{url}:predict", json={"instances": [ROW]}, timeout=30)
        if response.status_code == 200:
            assert response.json() == {"predictions": [[5.0, 10.0, 15.0, 20.0]]}
        return response.status_code == 200

    _wait(answers, "the new model to answer")

    def evicted() -> bool:
        status = requests.get(url, timeout=30).json()["model_version_status"][0]["status"]
        return str(status.get("error_message", "")).startswith("evicted (idle)")

    _wait(evicted, "the idle version to be unloaded")
    _wait(answers, "the version to load again on a request")  # 503 while it loads, past 5 s


def test_a_new_version_goes_live_under_traffic_without_a_failed_request(deployed: Deployment) -> None:
    new = b'{"predictions":[[3.0,6.0,9.0,12.0]]}'
    with Traffic(deployed.url) as traffic:
        write_onnx_affine(deployed.repository / "affine" / "2", 3.0)
        _wait(lambda: bool(traffic.answers) and traffic.answers[-1][1] == new, "version 2 to answer")
    assert not traffic.failures
    assert {status for status, _ in traffic.answers} == {200}
    assert {body for _, body in traffic.answers} <= {b'{"predictions":[[2.0,4.0,6.0,8.0]]}', new}


def test_scaling_one_two_one_under_load_loses_nothing(deployed: Deployment) -> None:
    first = deployed.cluster.local.replica_pids()
    assert len(first) == 1
    with ExitStack() as clients:  # several kept-alive connections, spread over both replicas
        traffic = [clients.enter_context(Traffic(deployed.url)) for _ in range(4)]
        deployed.deploy("--num_replicas=2")
        _wait(lambda: len(deployed.cluster.local.replica_pids()) == 2, "a second replica process")
        _wait(lambda: deployed.replicas_running() == 2, "two replicas running")
        # Only the scaling flags changed: Serve adds a replica and keeps the running one.
        assert first[0] in deployed.cluster.local.replica_pids()
        removing = time.monotonic()
        deployed.deploy("--num_replicas=1")
        _wait(lambda: len(deployed.cluster.local.replica_pids()) == 1, "the second replica to drain and exit")
        # A removed replica stays reachable for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (5 s
        # here, Serve's default 30 s), then refuses connections and exits once its requests end.
        assert time.monotonic() - removing < 28
        answered = [len(client.answers) for client in traffic]
        _wait(
            lambda: all(len(c.answers) > n + 5 for c, n in zip(traffic, answered, strict=True)),
            "answers after scaling down",
        )
    assert not [failure for client in traffic for failure in client.failures]
    assert {status for client in traffic for status, _ in client.answers} == {200}


def test_autoscaling_follows_the_requests_inferd_has_in_flight(deployed: Deployment) -> None:
    # HTTP requests reach inferd without Serve counting them (inferd.ray.ingress): Serve's
    # autoscaler must see inferd's own count to add a replica under load and remove it after.
    write_python_model(deployed.repository / "busy" / "1", slow_model(0.05), ROW_AWARE_SIGNATURE)
    scaling = ("--min_replicas=1", "--max_replicas=2", "--target_ongoing_requests=1", "--upscale_delay_s=1")
    deployed.deploy(*scaling)
    _wait(lambda: deployed.replicas_running() == 1, "one replica")
    _wait(lambda: requests.get(f"{deployed.url}/v1/models/busy", timeout=5).ok, "model busy on the replica")
    with ExitStack() as clients:
        traffic = [clients.enter_context(Traffic(deployed.url, "busy", [1.0, 2.0])) for _ in range(4)]
        _wait(lambda: deployed.replicas_running() == 2, "a second replica under load")
    _wait(lambda: len(deployed.cluster.local.replica_pids()) == 1, "the second replica to go once idle")
    assert not [failure for client in traffic for failure in client.failures]
    assert {status for client in traffic for status, _ in client.answers} == {200}


def test_autoscaling_follows_a_busy_event_loop_when_no_request_waits(deployed: Deployment) -> None:
    # A fast model's requests are computed on the replica's event loop as they arrive: inferd's
    # in-flight count stays near 0 while the loop fills (the queue is in sockets and HAProxy).
    # With a target no count reaches, only the loop's utilization can add the replica. The target
    # is low: on two cores a starting replica takes CPU from the clients, the first replica's loop
    # then has less to do, and with a target near what it reads under this load the policy
    # stopped each new replica before it ran (downscale_delay_s is 1 here).
    scaling = ("--min_replicas=1", "--max_replicas=2", "--target_ongoing_requests=1000")
    deployed.deploy(*scaling, "--target_loop_utilization=0.05", "--upscale_delay_s=1")
    _wait(lambda: deployed.replicas_running() == 1, "one replica")
    with ExitStack() as clients:
        traffic = [clients.enter_context(Traffic(deployed.url)) for _ in range(4)]
        _wait(lambda: deployed.replicas_running() == 2, "a second replica while the loop is busy")
    _wait(lambda: len(deployed.cluster.local.replica_pids()) == 1, "the second replica to go once idle")
    assert not [failure for client in traffic for failure in client.failures]
    assert {status for client in traffic for status, _ in client.answers} == {200}


def test_scaled_to_zero_a_prediction_waits_a_bounded_time_and_still_starts_a_replica(
    deployed: Deployment,
) -> None:
    # inferd's autoscaling policy leaves scaling up from zero to Serve's own cold start, which
    # counts the request the node's proxy holds while no replica runs.
    deployed.deploy("--min_replicas=0", "--max_replicas=1")
    _wait(lambda: not deployed.cluster.local.replica_pids(), "the replicas to scale to zero", timeout_s=240)
    predict = f"{deployed.url}/v1/models/affine:predict"
    sent = time.monotonic()
    refused = requests.post(predict, json={"instances": [ROW]}, timeout=60)
    waited = time.monotonic() - sent
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == str(COLD_WAIT_S)
    assert "scaling up from zero" in refused.json()["error"]
    assert COLD_WAIT_S <= waited < COLD_WAIT_S + 2
    # The refused request stays queued in Serve, so a replica starts with no other request sent.
    _wait(lambda: len(deployed.cluster.local.replica_pids()) == 1, "a replica to start", timeout_s=120)
    # A client that follows Retry-After is answered (the replica may have scaled to zero again
    # after answering the held request: this deployment scales down after 1 s).
    deadline = time.monotonic() + 120
    while (answer := requests.post(predict, json={"instances": [ROW]}, timeout=60)).status_code == 503:
        assert time.monotonic() < deadline, answer.text
        time.sleep(int(answer.headers["retry-after"]))
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] in ([[2.0, 4.0, 6.0, 8.0]], [[3.0, 6.0, 9.0, 12.0]])  # version 1 or 2


def test_a_killed_replica_answers_or_refuses_never_hangs(deployed: Deployment) -> None:
    deployed.deploy("--num_replicas=2")
    _wait(lambda: deployed.replicas_running() == 2, "two replicas")
    replicas = deployed.cluster.local.replica_pids
    with Traffic(deployed.url) as traffic:
        _wait(lambda: len(traffic.answers) > 5, "traffic to flow")
        victim = replicas()[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        dead_at = _death(victim)
        # The victim may still be listed for a moment after the signal: wait for its replacement.
        _wait(lambda: victim not in replicas() and len(replicas()) == 2, "the killed replica to be replaced")
        replaced_at = time.monotonic()
        answered = len(traffic.answers)
        _wait(lambda: len(traffic.answers) > answered + 5, "answers after the replacement")
    # Every request sent after the kill is answered (HAProxy replays on the other replica what
    # the dead one never answered) with 200 or 503. The one request the client had in flight
    # while the replica died may have had its answer's head forwarded by HAProxy already (seen:
    # IncompleteRead, 0 of 35 body bytes), or have gone out on HAProxy's kept-alive connection to
    # the process before HAProxy saw that connection close (seen: sent 4 ms after the signal, and
    # once 1 ms after the exit, RemoteDisconnected): nothing can replay half an answer, so the
    # connection closes at once. When HAProxy gives up on such a request it answers with its own
    # error page instead, which Serve's HAProxy configuration turns into a 500 (seen once). It
    # must end so, never by timing out, and only for a request sent before HAProxy could notice.
    settle_s = 0.1
    context = (
        f"killed at {killed_at:.3f}, dead at {dead_at:.3f}, replaced at {replaced_at:.3f}: {traffic.failures}"
    )
    refused = [
        span
        for span, (status, body) in zip(traffic.spans, traffic.answers, strict=True)
        if status == 500 and body == HAPROXY_ERROR
    ]
    hit = [(started, ended) for started, ended, _ in traffic.cut] + refused
    assert len(hit) <= 1, context  # one client thread: one request in flight at a time
    assert all(started < dead_at + settle_s and killed_at <= ended for started, ended in hit), (context, hit)
    assert not any(isinstance(error, requests.Timeout) for *_, error in traffic.cut), context
    unexpected = [
        answer for answer in traffic.answers if answer[0] not in (200, 503) and answer != (500, HAPROXY_ERROR)
    ]
    assert not unexpected, f"{context}; answers other than 200 and 503: {unexpected[:3]}"


HAPROXY_ERROR = b"Internal Server Error"
"""The body of HAProxy's own error answers (502, 503, 504) as Serve's configuration rewrites them."""

REFUSING_MODEL = """
def load(self):
    pass

def predict(self, inputs):
    x = inputs["x"]
    if (x < 0).any():
        raise ValueError("negative values")
    return {"y": x * 2 + 1}
"""


def _scrape(url: str) -> tuple[float, dict[str, float], float]:
    """From ``url``'s ``/metrics``: the requests model affine answered, the requests each worker
    (replica) answered, and how many replicas the scrape merged."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    affine = 0.0
    workers: dict[str, float] = {}
    scraped = 0.0
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key.startswith("inferd_requests_total{") and 'model="affine"' in key:
            affine += float(value)
        elif key.startswith("inferd_worker_requests_total{"):
            worker = key.partition('worker="')[2].partition('"')[0]
            workers[worker] = workers.get(worker, 0.0) + float(value)
        elif key == "inferd_workers_scraped":
            scraped = float(value)
    return affine, workers, scraped


def test_metrics_scraped_through_any_door_count_every_replica(deployed: Deployment) -> None:
    deployed.deploy("--num_replicas=2")
    _wait(
        lambda: deployed.replicas_running() == 2 and len(_replica_urls(deployed.cluster)) == 2, "2 replicas"
    )
    replicas = deployed.cluster.status()["replicas"]
    before = _scrape(deployed.url)[0]
    urls = _replica_urls(deployed.cluster)
    for url in urls:  # each replica answers five, at its own address
        for _ in range(5):
            answer = requests.post(f"{url}/v1/models/affine:predict", json={"instances": [ROW]}, timeout=60)
            assert answer.status_code == 200, answer.text
    for url in [deployed.url, *urls]:  # the ingress, or either replica: the same totals
        affine, workers, scraped = _scrape(url)
        assert scraped == 2, url
        assert sorted(workers) == replicas, url
        assert affine - before == 5 * len(urls), url


def test_grpc_honours_the_client_deadline_and_refuses_unparsable_messages(
    deployed: Deployment, tmp_path: Path
) -> None:
    calls, started = tmp_path / "calls.log", tmp_path / "started.log"
    # slow_model logs a call once computed; this one also logs when it starts computing.
    body = slow_model(0.5, log=calls).replace(
        "    import time\n", f"    import time\n    open({str(started)!r}, 'a').write('start\\n')\n"
    )
    write_model(
        deployed.repository / "slow",
        body,
        "max_batch_size = 1\nbatch_timeout_micros = 0\nnum_batch_threads = 1",
    )
    deployed.deploy("--num_replicas=1")
    client = triton.InferenceServerClient(deployed.grpc_target)
    x = triton.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))

    def ready() -> bool:
        try:
            return bool(client.is_model_ready("slow"))
        except InferenceServerException:
            return False

    _wait(ready, "model slow on the replica")
    calls.write_text("")
    started.write_text("")
    with cf.ThreadPoolExecutor(5) as pool:
        first = pool.submit(client.infer, "slow", [x], client_timeout=30)
        _wait(lambda: started.read_text() != "", "the first call computing")
        late = [pool.submit(client.infer, "slow", [x], client_timeout=0.2) for _ in range(4)]
        for future in late:
            with pytest.raises(InferenceServerException) as raised:
                future.result()
            assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert first.result().as_numpy("y").tolist() == [[2.0, 2.0]]
    # One thread computes one call at a time, in order: once this one is answered, anything
    # wrongly kept of the four expired calls has been computed too.
    assert client.infer("slow", [x], client_timeout=30).as_numpy("y").tolist() == [[2.0, 2.0]]
    assert len(calls.read_text().splitlines()) == 2  # the expired four were never computed
    client.close()

    with grpc.insecure_channel(deployed.grpc_target) as channel:
        predict: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/tensorflow.serving.PredictionService/Predict"
        )
        with pytest.raises(grpc.RpcError) as refused:
            predict(b"\x0a\x05ab", timeout=30)  # field 1 claims 5 bytes; 2 follow
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert "not a valid /tensorflow.serving.PredictionService/Predict message" in str(refused.value.details())


def _batch(
    *args: object, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "inferd", "batch", *map(str, args), "--progress=log"]
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=400, check=False)


def test_batch_on_ray_data_writes_what_the_local_engine_writes(cluster: Cluster, tmp_path: Path) -> None:
    model = tmp_path / "refusing"
    write_python_model(model / "1", REFUSING_MODEL)
    lines = ["id,a,b"]
    for i in range(3000):
        a = -1.0 if i % 701 == 5 else float(i)  # refused by the model: rejected row by row
        lines.append(f"{i * 10},{'abc' if i % 997 == 3 else a},{i / 2}")  # 'abc': refused by the reader
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    common = ("--id-column=id", "--memory-budget-mb=0.5", "--batch-size=64")  # a dozen chunks

    # Paths relative to the working directory: the Ray reader reads them where inferd batch runs.
    local = _batch(model, "in.csv", "local.csv", *common, cwd=tmp_path)
    summary = tmp_path / "summary.json"
    on_ray = _batch(
        model,
        "in.csv",
        "ray.csv",
        *common,
        "--engine=ray",
        f"--address={cluster.address}",
        "--actors=2",
        f"--summary-json={summary}",
        env=cluster.env,
        cwd=tmp_path,
    )
    assert (local.returncode, on_ray.returncode) == (1, 1), on_ray.stderr[-4000:]
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    rejects = (tmp_path / "ray.csv.rejects.jsonl").read_text()
    assert rejects == (tmp_path / "local.csv.rejects.jsonl").read_text()
    assert "negative values" in rejects
    assert "'abc' is not a float32 value" in rejects
    assert '"file":"in.csv"' in rejects
    stats = json.loads(summary.read_text())
    assert stats["rows"] + 9 == 3000  # 5 refused by the model, 4 by the reader
    assert stats["chunk_rows"] < 3000

    failing = _batch(
        model,
        tmp_path / "in.csv",
        tmp_path / "none.csv",
        "--outputs=z",
        "--engine=ray",
        f"--address={cluster.address}",
        env=cluster.env,
    )
    assert failing.returncode == 2
    assert "--outputs: signature 'serving_default' has no output(s) ['z']" in failing.stderr


def test_batch_on_ray_data_joins_features_as_the_local_engine_does(cluster: Cluster, tmp_path: Path) -> None:
    model = tmp_path / "eta"  # y = 2x + 1, two of x's three columns looked up by restaurant_id
    model.mkdir()
    write_store(model / "restaurants.parquet")
    write_features_model(model, "restaurants.parquet")
    pq.write_table(requests_table(unknown_every=100), tmp_path / "requests.parquet")
    args = (model, tmp_path / "requests.parquet")
    common = ("--id-column=id", "--batch-size=64", "--memory-budget-mb=2")

    local = _batch(*args, tmp_path / "local.parquet", *common)
    on_ray = _batch(
        *args,
        tmp_path / "ray.parquet",
        *common,
        "--engine=ray",
        f"--address={cluster.address}",
        env=cluster.env,
    )
    assert (local.returncode, on_ray.returncode) == (1, 1), on_ray.stderr[-4000:]  # 30 unknown entities
    assert "2970 rows scored, 30 rejected" in on_ray.stderr
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()
    rejects = [(tmp_path / f"{n}.parquet.rejects.jsonl").read_text() for n in ("local", "ray")]
    assert rejects[0] == rejects[1]
    assert "is not in feature store restaurants.parquet" in rejects[1]


SLOW_MODEL = """
def load(self):
    pass

def predict(self, inputs):
    import time
    time.sleep(0.05)
    return {"y": inputs["x"] * 2 + 1}
"""


def _csv(path: Path, rows: int) -> Path:
    path.write_text("id,a,b\n" + "".join(f"{i * 10},{i},{i / 2}\n" for i in range(rows)))
    return path


def test_batch_on_ray_data_reads_and_writes_s3_and_resumes_after_a_kill(
    cluster: Cluster, tmp_path: Path
) -> None:
    model = tmp_path / "slow"
    write_python_model(model / "1", SLOW_MODEL)
    common = ("--id-column=id", "--memory-budget-mb=0.5", "--batch-size=64")
    on_ray = ("--engine=ray", f"--address={cluster.address}", "--actors=2")

    # Model, input and output in a bucket: each actor reads the model from it itself.
    client = cluster.s3.client()
    client.create_bucket(Bucket="batch")
    cluster.s3.upload_folder(model, "batch", "models/slow")
    client.upload_file(str(_csv(tmp_path / "small.csv", 3000)), "batch", "in/small.csv")
    remote = ("s3://batch/models/slow", "s3://batch/in/small.csv")
    local = _batch(*remote, "s3://batch/out/local.csv", *common, env=cluster.env)
    assert local.returncode == 0, local.stderr[-4000:]
    ray = _batch(*remote, "s3://batch/out/ray.csv", *common, *on_ray, env=cluster.env)
    assert ray.returncode == 0, ray.stderr[-4000:]
    objects = [client.get_object(Bucket="batch", Key=f"out/{n}.csv")["Body"].read() for n in ("local", "ray")]
    assert objects[0] == objects[1]
    assert objects[0].count(b"\n") == 3001

    # Killed while Ray Data scores, then resumed on Ray: no chunk redone, none lost.
    args = (model, _csv(tmp_path / "in.csv", 20_000), tmp_path / "out.csv", *common)
    started = subprocess.Popen(
        [sys.executable, "-m", "inferd", "batch", *map(str, args), *on_ray, "--progress=none"],
        env=cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "out.csv.partial"

    def written() -> int:  # a part is written as .tmp, then renamed
        return len([p for p in parts.glob("part-*") if not p.name.endswith(".tmp")])

    # Chunks come back one by one as actors score them (about 90 chunks, 0.2 s each, 2 actors).
    _wait(lambda: written() >= 3 or started.poll() is not None, "three finished chunks")
    started.kill()
    started.wait()
    assert not (tmp_path / "out.csv").exists(), "the job ended before it was killed"
    finished = written()
    summary = tmp_path / "summary.json"
    resumed = _batch(*args, *on_ray, "--resume", f"--summary-json={summary}", env=cluster.env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    stats = json.loads(summary.read_text())
    assert stats["resumed_rows"] >= finished * stats["chunk_rows"]
    assert stats["rows"] + stats["resumed_rows"] == 20_000
    whole = _batch(*args[:2], tmp_path / "whole.csv", *common)
    assert whole.returncode == 0, whole.stderr[-4000:]
    assert (tmp_path / "out.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def _replica_urls(cluster: Cluster) -> list[str]:
    """Each replica's own REST address (Serve's direct ingress), read from HAProxy's configs
    (one per node, in a folder named for the node beside the configured path)."""
    folder = Path(cluster.env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    lines = {line for config in folder.glob("**/haproxy.cfg") for line in config.read_text().splitlines()}
    urls = []
    for line in lines:
        words = line.split()
        if words[:1] == ["server"] and "backup" not in words and "grpc" not in line.lower():
            address = f"http://{words[2]}"
            try:
                if requests.get(f"{address}/v2/health/live", timeout=5).status_code == 200:
                    urls.append(address)
            except requests.RequestException:  # a gRPC port, or a replica going away
                pass
    return sorted(urls)


def _predict_by_name(session: requests.Session, url: str, name: str, scale: float) -> None:
    """Model ``name`` (``y = scale * x``) answers a prediction of ``ROW`` sent to ``url`` with
    its name in Serve's multiplexing header."""
    response = session.post(
        f"{url}/v1/models/{name}:predict",
        json={"instances": [ROW]},
        headers={"serve_multiplexed_model_id": name},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [[scale * v for v in ROW]]}


def _deploy_named_models(deployed: Deployment, prefix: str) -> list[str]:
    """Four new models ``<prefix>0..3`` (``y = (i + 1) * x``), served by 2 replicas that load
    models on demand; their names."""
    names = [f"{prefix}{i}" for i in range(4)]
    for i, name in enumerate(names):
        write_onnx_affine(deployed.repository / name / "1", float(i + 1))
    deployed.deploy("--num_replicas=2", "--memory_budget=512MiB")  # lazy loads, on demand
    _wait(
        lambda: deployed.replicas_running() == 2 and len(_replica_urls(deployed.cluster)) == 2, "2 replicas"
    )
    return names


def test_requests_naming_their_model_load_it_on_one_replica(deployed: Deployment) -> None:
    names = _deploy_named_models(deployed, "m")
    with requests.Session() as session:
        for _ in range(6):
            for i, name in enumerate(names):
                _predict_by_name(session, deployed.url, name, float(i + 1))

    def holders(name: str) -> list[str]:
        held = []
        for url in _replica_urls(deployed.cluster):
            status = requests.get(f"{url}/v1/models/{name}", timeout=30).json()
            if not status["model_version_status"][0]["status"].get("error_message"):
                held.append(url)
        return held

    placement = {name: holders(name) for name in names}
    assert all(len(urls) == 1 for urls in placement.values()), placement


def _reports(deployed: Deployment, token: str) -> dict[str, dict[str, object]]:
    response = requests.get(
        f"{deployed.url}/ray/replicas", headers={"authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    reports: dict[str, dict[str, object]] = response.json()["replicas"]
    return reports


def _every_replica(
    deployed: Deployment, token: str, replicas: int, check: Callable[[dict[str, object]], bool]
) -> bool:
    """True once exactly ``replicas`` replicas report and each report of model ``labelled`` passes."""
    reports = _reports(deployed, token)
    models = [report["models"] for report in reports.values()]
    return len(reports) == replicas and all(
        isinstance(m, dict) and isinstance(m.get("labelled"), dict) and check(m["labelled"]) for m in models
    )


def test_serves_python_proxy_routes_requests_naming_their_model_to_the_replica_holding_it(
    deployed: Deployment,
) -> None:
    names = _deploy_named_models(deployed, "py")
    _wait(lambda: len(_reports(deployed, "")) == 2, "both replicas reporting")
    # Serve's Python proxy (here its fallback proxy beside HAProxy) routes with Serve's router.
    proxy = f"http://127.0.0.1:{deployed.cluster.env['RAY_SERVE_FALLBACK_PROXY_HTTP_PORT']}"

    def announced(name: str) -> int:
        lists = [report.get("announced") for report in _reports(deployed, "").values()]
        return sum(isinstance(held, list) and name in held for held in lists)

    with requests.Session() as session:
        for i, name in enumerate(names):  # each first request loads the model on one replica
            _predict_by_name(session, proxy, name, float(i + 1))
            _wait(lambda: announced(name) == 1, f"a replica telling Serve it holds {name}")  # noqa: B023
        for _ in range(6):
            for i, name in enumerate(names):
                _predict_by_name(session, proxy, name, float(i + 1))
    assert {name: announced(name) for name in names} == dict.fromkeys(names, 1)
    for name in names:  # and inferd itself loaded it on one replica only
        statuses = [
            requests.get(f"{url}/v1/models/{name}", timeout=30).json()
            for url in _replica_urls(deployed.cluster)
        ]
        held = [s for s in statuses if not s["model_version_status"][0]["status"].get("error_message")]
        assert len(held) == 1, statuses


def _answers_by_label(deployed: Deployment, n: int) -> set[float]:
    """The first output of ``n`` predictions of label ``stable``, spread over the replicas."""
    seen = set()
    with requests.Session() as session:
        for _ in range(n):
            response = session.post(
                f"{deployed.url}/v1/models/labelled/labels/stable:predict",
                json={"instances": [ROW]},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            seen.add(response.json()["predictions"][0][0])
    return seen


def test_label_moves_and_rollouts_sent_to_one_replica_take_effect_on_all(deployed: Deployment) -> None:
    model = deployed.repository / "labelled"
    write_onnx_affine(model / "1", 10.0)
    write_onnx_affine(model / "2", 20.0)
    (model / "inferd.toml").write_text("version_policy = { all = true }\n[labels]\nstable = 1\n")
    token = ADMIN_TOKEN
    deployed.deploy("--num_replicas=2", f"--admin_token={token}")
    admin = {"authorization": f"Bearer {token}"}

    def both_loaded(m: dict[str, object]) -> bool:
        return m["versions"] == {"1": "AVAILABLE", "2": "AVAILABLE"} and m["labels"] == {"stable": 1}

    _wait(lambda: _every_replica(deployed, token, 2, both_loaded), "2 replicas serving labelled 1 and 2")
    assert _answers_by_label(deployed, 20) == {10.0}

    # A label move reaches one replica through the ingress; every replica follows it.
    moved = requests.post(
        f"{deployed.url}/dashboard/api/models/labelled/labels/stable",
        json={"version": 2},
        headers=admin,
        timeout=30,
    )
    assert moved.status_code == 200, moved.text
    _wait(
        lambda: _every_replica(deployed, token, 2, lambda m: m["labels"] == {"stable": 2}),
        "the move everywhere",
    )
    assert _answers_by_label(deployed, 40) == {20.0}
    reports = deployed.cluster.status()["reports"]
    assert isinstance(reports, dict), reports
    assert len(reports) == 2, reports

    # A rollout back to version 1 runs on every replica and finishes with the label moved on all.
    started = requests.post(
        f"{deployed.url}/v2/repository/models/labelled/rollout",
        json={"to": 1, "label": "stable", "steps": [50, 100], "step_s": 1},
        headers=admin,
        timeout=30,
    )
    assert started.status_code == 200, started.text

    def rolled_out(m: dict[str, object]) -> bool:
        rollout = m["rollout"]
        return isinstance(rollout, dict) and rollout["state"] == "done" and m["labels"] == {"stable": 1}

    _wait(lambda: _every_replica(deployed, token, 2, rolled_out), "the rollout done on every replica")
    assert _answers_by_label(deployed, 40) == {10.0}


def _ready_on_every_replica(deployed: Deployment, model: str, ready: bool) -> bool:
    """True once both replicas answer, each with ``model`` ready (V2 REST) or each not."""
    urls = _replica_urls(deployed.cluster)
    if len(urls) != 2:
        return False
    answers = [requests.get(f"{url}/v2/models/{model}/ready", timeout=30).status_code for url in urls]
    return all((status == 200) == ready for status in answers)


def test_grpc_admin_calls_sent_to_one_replica_take_effect_on_all(deployed: Deployment) -> None:
    for name in ("ga", "gb"):
        write_onnx_affine(deployed.repository / name / "1", 3.0)
    token = ADMIN_TOKEN
    deployed.deploy("--num_replicas=2", f"--admin_token={token}")
    _wait(lambda: _ready_on_every_replica(deployed, "ga", True), "model ga on both replicas")
    _wait(lambda: len(_reports(deployed, token)) == 2, "both replicas following the admin log")
    admin = {"authorization": f"Bearer {token}"}

    # V2's repository extension over gRPC: an unload, then a load, reach one replica each.
    client = triton.InferenceServerClient(deployed.grpc_target)
    try:
        client.unload_model("ga", headers=admin, client_timeout=60)
        _wait(lambda: _ready_on_every_replica(deployed, "ga", False), "ga unloaded on both replicas")
        client.load_model("ga", headers=admin, client_timeout=60)
        _wait(lambda: _ready_on_every_replica(deployed, "ga", True), "ga loaded again on both replicas")
    finally:
        client.close()

    # TF Serving's HandleReloadConfigRequest: the served models become the config's, everywhere.
    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.config.add(name="gb", base_path=str(deployed.repository / "gb"))
    with grpc.insecure_channel(deployed.grpc_target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        stub.HandleReloadConfigRequest(request, metadata=tuple(admin.items()), timeout=120)
    _wait(lambda: _ready_on_every_replica(deployed, "ga", False), "ga gone from both replicas")
    assert _ready_on_every_replica(deployed, "gb", True)
