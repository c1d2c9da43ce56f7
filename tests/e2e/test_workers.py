"""``--workers 2`` against real clients: both workers answer REST and gRPC, ``/metrics`` counts
them all, admin calls made through one worker hold in every worker (and in a worker restarted
later), a killed worker is replaced while the other answers, SIGTERM drains them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from inferd._proto.tensor_pb2 import TensorProto, TensorShapeProto
from inferd._proto.types_pb2 import DT_FLOAT
from tests.conftest import ServerProcess, free_port, launch
from tests.e2e.test_batching import slow_model
from tests.e2e.test_metrics import samples
from tests.inferd_process import reachable
from tests.models import write_onnx_affine, write_onnx_matmul_external, write_onnx_table, write_python_model
from tests.pki import Authority

ADMIN = {"authorization": "Bearer admin-secret"}
ROW = [1.0, 1.0, 1.0, 1.0]


@contextmanager
def socket_listening() -> Iterator[int]:
    """A port some other program listens on, for the length of a ``with``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Versions 1 (y = x) and 2 (y = 2x) of ``affine``, label ``stable`` -> 1, two workers."""
    repo = tmp_path_factory.mktemp("workers")
    write_onnx_affine(repo / "affine" / "1", scale=1.0)
    write_onnx_affine(repo / "affine" / "2", scale=2.0)
    (repo / "affine" / "inferd.toml").write_text("version_policy = { all = true }\n[labels]\nstable = 1\n")
    process = launch(repo, str(repo), "--workers=2", "--admin_token=admin-secret")
    process.wait_for(lambda: samples(process)[("inferd_workers_scraped", frozenset())] == 2, "both workers")
    yield process
    process.stop()


def workers(server: ServerProcess) -> list[int]:
    """The pids of the supervisor's children."""
    pid = server.process.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def per_worker(server: ServerProcess, protocol: str) -> dict[str, float]:
    """Requests each worker answered over ``protocol``, from the merged ``/metrics``."""
    return {
        dict(labels)["worker"]: count
        for (name, labels), count in samples(server).items()
        if name == "inferd_worker_requests_total" and dict(labels)["protocol"] == protocol
    }


def total_requests(server: ServerProcess) -> float:
    """Requests answered by every worker, over every model, protocol and status."""
    return sum(count for (name, _), count in samples(server).items() if name == "inferd_requests_total")


def rest_stable(server: ServerProcess) -> float:
    """``affine``'s label ``stable`` over REST, on a new connection: the scale of the version."""
    response = requests.post(
        f"{server.url}/v1/models/affine/labels/stable:predict", json={"instances": [ROW]}, timeout=10
    )
    assert response.status_code == 200, response.text
    return float(response.json()["predictions"][0][0])


def grpc_stable(server: ServerProcess) -> int:
    """``affine``'s label ``stable`` over gRPC, on a new channel: the version that answered."""
    tensor = TensorProto(
        dtype=DT_FLOAT,
        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1), TensorShapeProto.Dim(size=4)]),
        float_val=ROW,
    )
    request = ps.PredictRequest(
        model_spec=ps.ModelSpec(name="affine", version_label="stable"), inputs={"x": tensor}
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        response = ps_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    return int(response.model_spec.version.value)


def test_both_workers_answer_rest_and_grpc_and_metrics_count_every_request(server: ServerProcess) -> None:
    before = samples(server)
    counts: dict[str, dict[str, float]] = {}
    for protocol, call in (("tfserving_rest", rest_stable), ("tfserving_grpc", grpc_stable)):
        sent = 0
        while sent < 200 and len(per_worker(server, protocol)) < 2:
            for _ in range(10):
                call(server)
            sent += 10
        counts[protocol] = per_worker(server, protocol)
        assert len(counts[protocol]) == 2, f"{protocol}: {sent} requests reached one worker only"
        key = (
            "inferd_requests_total",
            frozenset({"model": "affine", "version": "1", "protocol": protocol, "status": "OK"}.items()),
        )
        assert samples(server)[key] - before.get(key, 0.0) == sent  # every worker's requests, counted once
    assert samples(server)[("inferd_workers_scraped", frozenset())] == 2


def test_admin_calls_through_one_worker_hold_in_every_worker(server: ServerProcess) -> None:
    moved = requests.post(
        f"{server.url}/dashboard/api/models/affine/labels/stable",
        json={"version": 2},
        headers=ADMIN,
        timeout=30,
    )
    assert moved.status_code == 200, moved.text
    rest_before, grpc_before = per_worker(server, "tfserving_rest"), per_worker(server, "tfserving_grpc")
    # The call returns once every worker applied it: no worker answers with the old version.
    assert {rest_stable(server) for _ in range(30)} == {2.0}
    assert {grpc_stable(server) for _ in range(30)} == {2}
    for protocol, before in (("tfserving_rest", rest_before), ("tfserving_grpc", grpc_before)):
        after = per_worker(server, protocol)
        assert all(after[w] > before.get(w, 0) for w in ("0", "1")), f"{protocol}: {before} -> {after}"

    unloaded = requests.post(f"{server.url}/v2/repository/models/affine/unload", headers=ADMIN, timeout=30)
    assert unloaded.status_code == 200, unloaded.text
    for _ in range(30):
        gone = requests.post(f"{server.url}/v1/models/affine:predict", json={"instances": [ROW]}, timeout=10)
        assert gone.status_code == 404, gone.text
    loaded = requests.post(f"{server.url}/v2/repository/models/affine/load", headers=ADMIN, timeout=30)
    assert loaded.status_code == 200, loaded.text
    assert {rest_stable(server) for _ in range(30)} == {2.0}  # the moved label outlives the unload


def test_admin_calls_through_both_workers_at_once_all_hold(server: ServerProcess) -> None:
    wanted = {f"l{i}": 1 + i % 2 for i in range(6)}
    answers: list[int] = []

    def move(label: str, version: int) -> None:
        answers.append(
            requests.post(
                f"{server.url}/dashboard/api/models/affine/labels/{label}",
                json={"version": version},
                headers=ADMIN,
                timeout=60,
            ).status_code
        )

    threads = [threading.Thread(target=move, args=item) for item in wanted.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * len(wanted)
    for label, version in wanted.items():  # no call lost another's change, in any worker
        for _ in range(10):
            response = requests.post(
                f"{server.url}/v1/models/affine/labels/{label}:predict", json={"instances": [ROW]}, timeout=10
            )
            assert response.json()["predictions"][0][0] == version, label


def test_a_killed_worker_is_replaced_with_the_admin_state_in_force(server: ServerProcess) -> None:
    moved = requests.post(
        f"{server.url}/dashboard/api/models/affine/labels/stable",
        json={"version": 2},
        headers=ADMIN,
        timeout=30,
    )
    assert moved.status_code == 200, moved.text
    for _ in range(20):
        rest_stable(server)
    answered = total_requests(server)  # this scrape merged both workers' counts
    victim, survivor = workers(server)
    os.kill(victim, signal.SIGKILL)
    server.wait_for(lambda: victim not in workers(server), "the killed worker to be reaped")
    assert {rest_stable(server) for _ in range(20)} == {2.0}  # the other worker answers meanwhile
    server.wait_for(lambda: len(workers(server)) == 2, "a new worker")
    (successor,) = set(workers(server)) - {survivor}
    assert "starting a new one" in server.log()
    # The new worker serves (its count starts from 0) and follows the label moved before it started.
    server.wait_for(
        lambda: rest_stable(server) == 2.0 and len(per_worker(server, "tfserving_rest")) == 2,
        "the new worker to answer",
    )
    assert {rest_stable(server) for _ in range(30)} == {2.0}
    assert successor in workers(server)
    # The killed worker's counts stay in /metrics: counters never went back (a false reset).
    assert total_requests(server) >= answered + 20 + 30


def test_a_new_version_on_disk_is_served_by_every_worker(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path / "affine" / "1", scale=1.0)
    server = launch(tmp_path, str(tmp_path), "--workers=2", poll_s=0.2)
    try:
        server.wait_for(lambda: samples(server)[("inferd_workers_scraped", frozenset())] == 2, "both workers")
        write_onnx_affine(tmp_path / "affine" / "2", scale=3.0)

        def latest() -> float:
            response = requests.post(
                f"{server.url}/v1/models/affine:predict", json={"instances": [ROW]}, timeout=10
            )
            return float(response.json()["predictions"][0][0])

        server.wait_for(lambda: {latest() for _ in range(20)} == {3.0}, "every worker to serve version 2")
        before = per_worker(server, "tfserving_rest")
        assert {latest() for _ in range(30)} == {3.0}
        after = per_worker(server, "tfserving_rest")
        assert all(after[w] > before.get(w, 0) for w in ("0", "1")), f"{before} -> {after}"
    finally:
        server.stop()


def test_every_worker_serves_tls(tmp_path: Path) -> None:
    authority = Authority(tmp_path / "pki", "inferd-test-ca")
    issued = authority.issue("server", server=True)
    write_onnx_affine(tmp_path / "repo" / "affine" / "1", scale=2.0)
    server = launch(
        tmp_path,
        str(tmp_path / "repo"),
        "--workers=2",
        f"--tls_cert={issued.cert}",
        f"--tls_key={issued.key}",
        wait=False,
    )
    url = server.url.replace("http://", "https://")

    def scraped() -> float:
        try:
            text = requests.get(f"{url}/metrics", verify=authority.cert, timeout=2).text
        except requests.ConnectionError:
            return 0.0
        return (
            float(text.split("\ninferd_workers_scraped ")[1].split()[0])
            if "inferd_workers_scraped " in text
            else 0.0
        )

    try:
        server.wait_for(lambda: scraped() == 2, "both workers over https")
        spread: dict[str, float] = {}
        for _ in range(20):
            response = requests.post(
                f"{url}/v1/models/affine:predict",
                json={"instances": [ROW]},
                verify=authority.cert,
                timeout=10,
            )
            assert response.json() == {"predictions": [[2.0] * 4]}
            metrics = requests.get(f"{url}/metrics", verify=authority.cert, timeout=5).text
            spread = {
                line.split('worker="')[1].split('"')[0]: float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("inferd_worker_requests_total{")
            }
            if len(spread) == 2:
                break
        assert len(spread) == 2, f"https requests reached one worker only: {spread}"
    finally:
        server.stop()


def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path) -> None:
    write_python_model(tmp_path / "slow" / "1", slow_model(0.5))
    server = launch(tmp_path, str(tmp_path), "--workers=2", "--drain_timeout_s=10")
    try:
        server.wait_for(lambda: samples(server)[("inferd_workers_scraped", frozenset())] == 2, "both workers")
        pids = workers(server)
        statuses: list[int] = []

        def call() -> None:
            response = requests.post(
                f"{server.url}/v1/models/slow:predict", json={"instances": [[1.0, 2.0]]}, timeout=10
            )
            statuses.append(response.status_code)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        server.wait_for(
            lambda: (
                sum(float(v) for k, v in samples(server).items() if k[0] == "inferd_in_flight_requests") >= 2
            ),
            "requests in flight",
        )
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=15)
        assert server.process.wait(timeout=20) == 0
        assert statuses == [200] * 8  # the requests in flight were answered
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists()
        assert server.log().count("exited (exit status 0)") == 2
    finally:
        server.stop()


def test_a_temporary_folder_too_deep_for_the_metrics_sockets_keeps_the_workers_supervised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Unix socket path holds 107 bytes at most: past that, /metrics leaves the other workers
    out (an error says so), but the workers still tell the supervisor they serve, so that a killed
    one is replaced instead of ending the server as a start that failed."""
    write_onnx_affine(tmp_path / "repo" / "affine" / "1", scale=1.0)
    deep = tmp_path / ("t" * 100)
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    server = launch(tmp_path, str(tmp_path / "repo"), "--workers=2")
    try:
        server.wait_for(lambda: "all 2 workers serving" in server.log(), "both workers to report")
        assert (
            "the other workers' /metrics will leave this worker's out: AF_UNIX path too long" in server.log()
        )
        os.kill(workers(server)[0], signal.SIGKILL)
        server.wait_for(lambda: "starting a new one" in server.log(), "the killed worker to be replaced")
        server.wait_for(lambda: server.log().count("all 2 workers serving") == 2, "a new worker")
        answer = requests.post(
            f"{server.url}/v1/models/affine:predict", json={"instances": [ROW]}, timeout=10
        )
        assert answer.json() == {"predictions": [ROW]}
    finally:
        server.stop()


def test_workers_cannot_start_on_a_port_in_use_and_the_server_exits_2(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path / "affine" / "1", scale=1.0)
    with socket_listening() as port:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "inferd",
                "serve",
                str(tmp_path),
                "--host=127.0.0.1",
                f"--rest_api_port={port}",
                f"--port={free_port()}",
                "--workers=2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert "(--rest_api_port); is the port in use?" in result.stderr


def test_no_other_server_starts_on_the_ports_while_the_workers_load(tmp_path: Path) -> None:
    """The supervisor's reservation alone keeps the ports: no worker listens yet."""
    # the first server's workers load this for 30 s, so that nothing of theirs listens meanwhile
    slow_load = "def load(self):\n    import time\n    time.sleep(30)\n\ndef predict(self, x):\n    return x"
    write_python_model(tmp_path / "a" / "slow" / "1", slow_load)
    write_onnx_affine(tmp_path / "b" / "affine" / "1", scale=1.0)
    first = launch(tmp_path, str(tmp_path / "a"), "--workers=2", wait=False)
    try:
        first.wait_for(lambda: len(workers(first)) == 2, "the workers to start loading")
        rest, grpc_port = first.url.rsplit(":", 1)[1], first.grpc_target.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "inferd", "serve", str(tmp_path / "b"), "--host=127.0.0.1"]
        for count in ("--workers=2", "--workers=1"):
            second = subprocess.Popen(
                [*command, f"--rest_api_port={rest}", f"--port={grpc_port}", count],
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                _, stderr = second.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                second.terminate()
                second.communicate(timeout=30)
                pytest.fail(f"a second server ({count}) started on the ports of one loading its models")
            assert second.returncode == 2, stderr
            assert "is the port in use?" in stderr
        assert not reachable(first.url)  # still loading: only the reservation held the ports
    finally:
        first.stop()


def test_bad_workers_value_names_the_flag(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inferd", "serve", str(tmp_path), "--workers=none"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--workers: expected a whole number of processes (1 or more) or auto, got 'none'" in result.stderr


def shared_kib(pid: int, file: Path) -> tuple[int, int]:
    """Resident and shared KiB of process ``pid``'s mappings of ``file`` (shared: pages another
    process maps too; dirty ones too, as a file just written still is in the page cache)."""
    rss = shared = 0
    mapped = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header line
            mapped = fields[-1] == str(file)
        elif mapped and fields[0] == "Rss:":
            rss += int(fields[1])
        elif mapped and fields[0] in ("Shared_Clean:", "Shared_Dirty:"):
            shared += int(fields[1])
    return rss, shared


@pytest.mark.parametrize("share", [True, False])
def test_share_weights_keeps_one_copy_of_external_weights_for_every_worker(
    tmp_path: Path, share: bool
) -> None:
    version = tmp_path / "mm" / "1"
    write_onnx_matmul_external(version, width=1024)  # 4 MiB of weights
    (tmp_path / "mm" / "inferd.toml").write_text(f"[onnx]\nshare_weights = {str(share).lower()}\n")
    server = launch(tmp_path, str(tmp_path), "--workers=2")
    try:
        server.wait_for(lambda: samples(server)[("inferd_workers_scraped", frozenset())] == 2, "both workers")
        weights = (version / "weights.bin").resolve()
        for pid in workers(server):
            rss, shared = shared_kib(pid, weights)
            if share:  # both workers read the weights from the same page-cache pages
                assert rss >= 4096, f"worker {pid} maps {rss} KiB of weights.bin"
                assert shared >= 4096, f"worker {pid} shares {shared} KiB of weights.bin"
            else:  # repacked into private memory: the file's mapping is gone
                assert rss == 0
    finally:
        server.stop()


def test_share_weights_gives_every_worker_one_mapped_copy_of_embedded_weights(
    tmp_path: Path,
) -> None:
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    table = write_onnx_table(repo / "table" / "1", 4, seed=3)
    (repo / "table" / "inferd.toml").write_text("[onnx]\nshare_weights = true\n")
    server = launch(tmp_path, str(repo), "--workers=2", f"--model_cache_dir={cache}")
    try:
        server.wait_for(lambda: samples(server)[("inferd_workers_scraped", frozenset())] == 2, "both workers")
        sent = 0
        while sent < 200 and len(per_worker(server, "tfserving_rest")) < 2:
            for _ in range(10):  # each on a new connection, which either worker may accept
                answer = requests.post(
                    f"{server.url}/v1/models/table:predict", json={"instances": [5, 9]}, timeout=10
                )
                assert answer.status_code == 200, answer.text
                got = np.asarray(answer.json()["predictions"], dtype=np.float32)
                assert np.array_equal(got, table[[5, 9]])
            sent += 10
        assert len(per_worker(server, "tfserving_rest")) == 2, f"{sent} requests reached one worker only"
        # Both workers loaded at start, racing to write the copy: one was written, and both map it.
        [weights] = (cache / "derived" / "onnx-mapped").glob("*/weights.bin")
        for pid in workers(server):
            assert str(weights.resolve()) in Path(f"/proc/{pid}/maps").read_text(), pid
    finally:
        server.stop()
