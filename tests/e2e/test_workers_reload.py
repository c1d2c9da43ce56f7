"""HandleReloadConfigRequest under ``--workers 2`` with ``--model_config_file``: a worker killed
and restarted afterwards serves what the other worker serves, whether the file is polled or not."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import requests

from inferd._proto import model_service_pb2 as ms
from inferd._proto import model_service_pb2_grpc as ms_grpc
from tests.conftest import ServerProcess, launch
from tests.e2e.test_metrics import samples
from tests.e2e.test_workers import workers
from tests.models import write_onnx_affine


def write_config(path: Path, *names: str) -> None:
    entries = " ".join(f'config {{ name: "{n}" base_path: "{path.parent / n}" }}' for n in names)
    partial = path.with_suffix(".partial")
    partial.write_text(f"model_config_list {{ {entries} }}")
    partial.replace(path)


def reload(server: ServerProcess, folder: Path, *names: str) -> None:
    request = ms.ReloadConfigRequest()
    for name in names:
        request.config.model_config_list.config.add(name=name, base_path=str(folder / name))
    with grpc.insecure_channel(server.grpc_target) as channel:
        ms_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            request, metadata=(("authorization", "Bearer admin-secret"),), timeout=60
        )


def answers(server: ServerProcess, model: str) -> set[int]:
    """The statuses of ``model``'s status over 30 new connections (they reach both workers)."""
    return {requests.get(f"{server.url}/v1/models/{model}", timeout=10).status_code for _ in range(30)}


def both_workers(server: ServerProcess) -> bool:
    return samples(server)[("inferd_workers_scraped", frozenset())] == 2


def start(tmp_path: Path, *args: str) -> ServerProcess:
    for name in ("a", "b"):
        write_onnx_affine(tmp_path / name / "1", scale=1.0)
    write_config(tmp_path / "models.config", "a", "b")
    server = launch(
        tmp_path,
        f"--model_config_file={tmp_path / 'models.config'}",
        "--workers=2",
        "--admin_token=admin-secret",
        *args,
    )
    server.wait_for(lambda: both_workers(server), "both workers")
    return server


def restart_a_worker(server: ServerProcess) -> None:
    victim = workers(server)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for(
        lambda: victim not in workers(server) and len(workers(server)) == 2 and both_workers(server),
        "a new worker",
    )


def test_a_restarted_worker_serves_the_reloaded_models_of_a_file_read_once(tmp_path: Path) -> None:
    server = start(tmp_path)  # the file is read once (no poll)
    try:
        reload(server, tmp_path, "a")
        assert answers(server, "b") == {404}
        restart_a_worker(server)
        assert answers(server, "b") == {404}
        assert answers(server, "a") == {200}
    finally:
        server.stop()


def test_a_restarted_worker_serves_the_file_that_changed_after_a_reload(tmp_path: Path) -> None:
    server = start(tmp_path, "--model_config_file_poll_wait_seconds=1", "--file_system_poll_wait_seconds=1")
    try:
        reload(server, tmp_path, "a")
        assert answers(server, "b") == {404}
        write_config(tmp_path / "models.config", "b")  # the file's models hold again
        server.wait_for(lambda: answers(server, "a") == {404}, "every worker to serve the file's models")
        restart_a_worker(server)
        assert answers(server, "a") == {404}
        assert answers(server, "b") == {200}
    finally:
        server.stop()
