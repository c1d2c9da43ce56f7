"""Version churn against a real server: 100 swaps (a version added, the oldest retired and its
folder removed, labels moved, every tenth new version corrupt and then fixed) through the model
config file, under continuous traffic to the latest version (V2 REST) and to two labels (TF
Serving gRPC). Every answer must come from a version that was legitimately serving what it asked
for while it was in flight, no corrupt version ever answers, and the process's memory and threads
come back to their baseline once old versions are unloaded."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
import requests
from onnx import TensorProto, helper

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from tests.conftest import ServerProcess, launch
from tests.e2e.test_grpc import tensor_proto, to_numpy

SWAPS = 100
BALLAST = 1 << 18
"""Columns of the weight matrix: 4 x 2^18 floats = 4 MiB per version, so a leaked version shows."""

V2_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}


def write_version(base: Path, version: int, corrupt: bool = False) -> None:
    """``y = x * version`` through a 4 x 2^18 weight matrix, or garbage; moved in atomically."""
    staging = base / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if corrupt:
        (staging / "model.onnx").write_bytes(b"\x08\x07 not a protobuf \xff\xfe" * 50)
    else:
        weights = np.zeros((4, BALLAST), dtype=np.float32)
        weights[:, :4] = np.eye(4, dtype=np.float32) * version
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["wide"]),
            helper.make_node("Slice", ["wide", "zero", "four", "one"], ["y"]),
        ]
        inits = [
            helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.tobytes(), raw=True),
            helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
            helper.make_tensor("four", TensorProto.INT64, [1], [4]),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        ]
        graph = helper.make_graph(nodes, "ballast", [x], [y], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, staging / "model.onnx")
    target = base / str(version)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def write_config(path: Path, base: Path, stable: int, canary: int) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(
        f'model_config_list {{ config {{ name: "m" base_path: "{base}" '
        f"model_version_policy {{ specific {{ versions: {stable} versions: {canary} }} }} "
        f'version_labels {{ key: "stable" value: {stable} }} '
        f'version_labels {{ key: "canary" value: {canary} }} }} }}\n'
    )
    staging.replace(path)


@dataclass(frozen=True, slots=True)
class Answer:
    target: str
    sent: float
    answered: float
    version: int | None
    problem: str = ""


@dataclass
class History:
    """What each target (latest, stable, canary) legitimately resolved to, step by step."""

    steps: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def step_at(self, moment: float) -> int:
        return max(i for i, (written, _) in enumerate(self.steps) if written <= moment)

    def allowed(self, answer: Answer) -> set[int]:
        first = max(0, self.step_at(answer.sent) - 1)  # the server may not have applied it yet
        last = self.step_at(answer.answered)
        return {state[answer.target] for _, state in self.steps[first : last + 1]}


def v2_traffic(server: ServerProcess, stop: threading.Event, answers: list[Answer]) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            sent = time.monotonic()
            r = session.post(f"{server.url}/v2/models/m/infer", json=V2_BODY, timeout=30)
            if r.status_code != 200:
                answers.append(Answer("latest", sent, time.monotonic(), None, f"{r.status_code} {r.text}"))
                continue
            body = r.json()
            version = int(body["model_version"])
            problem = "" if body["outputs"][0]["data"] == [float(version)] * 4 else f"output {body}"
            answers.append(Answer("latest", sent, time.monotonic(), version, problem))


def label_traffic(server: ServerProcess, label: str, stop: threading.Event, answers: list[Answer]) -> None:
    request = ps.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.version_label = label
    request.inputs["x"].CopyFrom(tensor_proto(np.ones((1, 4), dtype=np.float32)))
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = ps_grpc.PredictionServiceStub(channel)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = stub.Predict(request, timeout=30)
            except grpc.RpcError as exc:
                answers.append(Answer(label, sent, time.monotonic(), None, f"{exc.code()} {exc.details()}"))
                continue
            version = response.model_spec.version.value
            values = to_numpy(response.outputs["y"], np.float32).tolist()
            problem = "" if values == [[float(version)] * 4] else f"output {values}"
            answers.append(Answer(label, sent, time.monotonic(), version, problem))


def usage(pid: int) -> tuple[int, int]:
    """Resident bytes and threads of ``pid``, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"])


def settled(server: ServerProcess, available: set[int], canary: int) -> Callable[[], bool]:
    def check() -> bool:
        status = server.status("m")
        serving = {int(v) for v, state in status.items() if state == "AVAILABLE"}
        if serving != available or any(state in ("LOADING", "UNLOADING") for state in status.values()):
            return False
        r = requests.get(f"{server.url}/v1/models/m/labels/canary/metadata", timeout=5)
        return r.ok and r.json()["model_spec"]["version"] == str(canary)

    return check


def test_a_hundred_version_swaps_under_traffic_lose_nothing_and_leak_nothing(tmp_path: Path) -> None:
    base, config = tmp_path / "m", tmp_path / "models.config"
    write_version(base, 1)
    write_version(base, 2)
    write_config(config, base, stable=1, canary=2)
    server = launch(
        tmp_path,
        f"--model_config_file={config}",
        "--model_config_file_poll_wait_seconds=0.1",
        "--file_system_poll_wait_seconds=0.1",
    )
    history = History([(time.monotonic(), {"latest": 2, "stable": 1, "canary": 2})])
    stop = threading.Event()
    answers: list[Answer] = []
    clients = [threading.Thread(target=v2_traffic, args=(server, stop, answers))]
    clients += [
        threading.Thread(target=label_traffic, args=(server, label, stop, answers))
        for label in ("stable", "canary")
    ]
    fixed_at: dict[int, float] = {}
    """Corrupt version -> when its fixed files were written."""
    try:
        server.wait_for(settled(server, {1, 2}, canary=2), "versions 1 and 2")
        for client in clients:
            client.start()
        stable, canary, baseline = 1, 2, (0, 0)
        for step in range(1, SWAPS + 1):
            if step == 10:
                baseline = usage(server.process.pid)
            if step % 10 == 5:  # a corrupt new version: the canary label stays where it was
                new = canary + 1
                write_version(base, new, corrupt=True)
                stable, canary = canary, new
                history.steps.append(
                    (time.monotonic(), {"latest": stable, "stable": stable, "canary": stable})
                )
                write_config(config, base, stable, canary)
                server.wait_for(
                    lambda v=new: server.status("m").get(str(v)) == "END", f"step {step}: corrupt"
                )
                server.wait_for(settled(server, {stable}, canary=stable), f"step {step}: corrupt ignored")
            elif step % 10 == 6:  # the corrupt version fixed in place: now it loads
                fixed_at[canary] = time.monotonic()
                history.steps.append(
                    (fixed_at[canary], {"latest": canary, "stable": stable, "canary": canary})
                )
                write_version(base, canary)
                server.wait_for(settled(server, {stable, canary}, canary), f"step {step}: fixed")
            else:  # a new version: canary moves to it, stable to the old canary, the oldest goes
                retired, new = stable, canary + 1
                write_version(base, new)
                stable, canary = canary, new
                history.steps.append(
                    (time.monotonic(), {"latest": canary, "stable": stable, "canary": canary})
                )
                write_config(config, base, stable, canary)
                server.wait_for(settled(server, {stable, canary}, canary), f"step {step}: swapped")
                shutil.rmtree(base / str(retired))
        time.sleep(1.0)  # traffic on the final versions
        stop.set()
        for client in clients:
            client.join(timeout=30)
        time.sleep(1.0)  # unloading done, allocator settled
        after = usage(server.process.pid)
    finally:
        stop.set()
        server.stop()

    assert [a for a in answers if a.problem] == []  # zero failed requests, zero wrong outputs
    wrong = [a for a in answers if a.version not in history.allowed(a)]
    assert wrong == [], wrong[:5]  # every answer from a version legitimately serving its target
    assert len(fixed_at) == SWAPS // 10
    assert [a for a in answers if a.version in fixed_at and a.answered < fixed_at[a.version]] == []
    by_target = {t: sum(a.target == t for a in answers) for t in ("latest", "stable", "canary")}
    assert min(by_target.values()) >= SWAPS, by_target  # traffic ran throughout
    rss, threads = after
    assert rss - baseline[0] < 48 * 2**20, (baseline, after)  # 90 unloaded versions = 360 MiB if leaked
    assert threads - baseline[1] <= 4, (baseline, after)
    assert "Traceback" not in server.log()
