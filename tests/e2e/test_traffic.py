"""Weighted traffic splits: shares over many requests, sticky keys, a request that names its
version, every protocol naming the version that answered, and a split changed on the fly."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import requests
import tritonclient.grpc as grpcclient

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from inferd._proto.tensor_pb2 import TensorProto
from inferd._proto.types_pb2 import DT_FLOAT
from tests.conftest import ServerProcess
from tests.models import write_onnx_affine

ROW = [1.0, 2.0, 3.0, 4.0]


def two_versions(base: Path, traffic: str) -> None:
    """Versions 1 (y = x) and 2 (y = 2x), labels stable -> 1 and canary -> 2, and ``traffic``."""
    for version in (1, 2):
        (base / str(version)).mkdir(parents=True)
        write_onnx_affine(base / str(version), scale=float(version))
    write_settings(base, traffic)


def write_settings(base: Path, traffic: str) -> None:
    staging = base / "inferd.toml.new"
    staging.write_text(
        "version_policy = { all = true }\n[labels]\nstable = 1\ncanary = 2\n[traffic]\n" + traffic
    )
    staging.rename(base / "inferd.toml")


async def _predict_many(
    url: str, count: int, concurrency: int, keys: list[str] | None
) -> list[tuple[str, int]]:
    """``count`` v1 predictions, ``concurrency`` at once: (traffic key, version) for each, checking
    that each answer is the one its version computes."""
    answers: list[tuple[str, int]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            key = keys[i % len(keys)] if keys else ""
            headers = {"x-user": key} if key else {}
            async with session.post(url, json={"instances": [ROW]}, headers=headers) as response:
                assert response.status == 200, await response.text()
                version = int(response.headers["x-inferd-model-version"])
                body = await response.json()
            assert body["predictions"] == [[x * version for x in ROW]]
            answers.append((key, version))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return answers


def test_a_90_10_split_lands_within_one_and_a_half_points_over_10000_requests(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "affine"
    two_versions(base, "stable = 90\ncanary = 10\n")
    server = start_server(f"--model_base_path={base}", "--model_name=affine")
    answers = asyncio.run(_predict_many(f"{server.url}/v1/models/affine:predict", 10_000, 32, None))
    counts = collections.Counter(version for _, version in answers)
    assert set(counts) == {1, 2}
    assert abs(counts[2] / len(answers) - 0.10) <= 0.015, counts


def test_sticky_keys_never_switch_version_and_named_versions_are_not_split(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "affine"
    two_versions(base, "stable = 50\ncanary = 50\n")
    server = start_server(f"--model_base_path={base}", "--model_name=affine", "--traffic_key_header=X-User")
    keys = [f"user-{i}" for i in range(200)]
    answers = asyncio.run(_predict_many(f"{server.url}/v1/models/affine:predict", 2000, 16, keys))
    by_key: dict[str, set[int]] = collections.defaultdict(set)
    for key, version in answers:
        by_key[key].add(version)
    assert all(len(versions) == 1 for versions in by_key.values()), by_key
    assert {v for versions in by_key.values() for (v,) in [tuple(versions)]} == {1, 2}

    # The same key keeps its version on V2 REST and on both gRPC APIs, which name it too.
    key = keys[0]
    (expected,) = by_key[key]
    v2 = requests.post(
        f"{server.url}/v2/models/affine/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ROW}]},
        headers={"x-user": key},
        timeout=10,
    )
    assert v2.status_code == 200
    assert v2.json()["model_version"] == str(expected)
    assert v2.headers["x-inferd-model-version"] == str(expected)
    with grpc.insecure_channel(server.grpc_target) as channel:
        request = ps.PredictRequest(model_spec=ps.ModelSpec(name="affine"))
        tensor = TensorProto(dtype=DT_FLOAT, float_val=ROW)
        tensor.tensor_shape.dim.add(size=1)
        tensor.tensor_shape.dim.add(size=4)
        request.inputs["x"].CopyFrom(tensor)
        reply, rpc = ps_grpc.PredictionServiceStub(channel).Predict.with_call(
            request, metadata=(("x-user", key),), timeout=10
        )
        assert reply.model_spec.version.value == expected
        assert ("inferd-model-version", str(expected)) in tuple(rpc.trailing_metadata())
    client = grpcclient.InferenceServerClient(server.grpc_target)
    infer_input = grpcclient.InferInput("x", [1, 4], "FP32")
    infer_input.set_data_from_numpy(np.array([ROW], dtype=np.float32))
    assert client.infer("affine", [infer_input], headers={"x-user": key}).get_response().model_version == str(
        expected
    )

    # A request that names a label or a version is never split.
    for _ in range(20):
        named = requests.post(
            f"{server.url}/v1/models/affine/labels/stable:predict", json={"instances": [ROW]}, timeout=10
        )
        assert named.headers["x-inferd-model-version"] == "1"
        numbered = requests.post(
            f"{server.url}/v1/models/affine/versions/2:predict", json={"instances": [ROW]}, timeout=10
        )
        assert numbered.headers["x-inferd-model-version"] == "2"


def test_a_split_changes_on_the_fly_when_the_poll_reads_the_settings(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "affine"
    two_versions(base, "stable = 100\n")
    server = start_server(f"--model_base_path={base}", "--model_name=affine")
    url = f"{server.url}/v1/models/affine:predict"

    def versions(count: int) -> set[int]:
        return {version for _, version in asyncio.run(_predict_many(url, count, 4, None))}

    assert versions(50) == {1}
    write_settings(base, "canary = 100\n")
    server.wait_for(lambda: versions(20) == {2}, "the split to move to the canary")
    write_settings(base, '"1" = 1\n"2" = 0\n')
    server.wait_for(lambda: versions(20) == {1}, "the split to move back to version 1 by number")


def test_a_large_body_is_decoded_for_the_version_its_traffic_key_goes_to(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """A body large enough for a decode process is decoded for the signature of the version the
    request runs on; the two versions' signatures differ (output y vs. z), so decoding for the
    other one would fail the request with 503."""
    base = tmp_path / "affine"
    for version, output in ((1, "y"), (2, "z")):
        write_onnx_affine(base / str(version), scale=float(version), output=output)
    write_settings(base, "stable = 50\ncanary = 50\n")
    server = start_server(f"--model_base_path={base}", "--model_name=affine", "--traffic_key_header=X-User")
    rows = 70_000  # about 1.3 MB of JSON: past the decode process threshold (1 MiB)
    body = {"instances": [ROW] * rows}
    seen: dict[str, set[int]] = collections.defaultdict(set)
    for i in range(12):
        key = f"user-{i % 4}"
        response = requests.post(
            f"{server.url}/v1/models/affine:predict", json=body, headers={"x-user": key}, timeout=60
        )
        assert response.status_code == 200, response.text[:300]
        version = int(response.headers["x-inferd-model-version"])
        predictions = response.json()["predictions"]
        assert len(predictions) == rows
        assert predictions[0] == [x * version for x in ROW]
        seen[key].add(version)
    assert all(len(versions) == 1 for versions in seen.values()), seen
