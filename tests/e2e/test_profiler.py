"""TensorFlow's profiler service on the gRPC port (``--enable_profiler``, on by default as in TF
Serving): TensorFlow's own profiler client traces the server while it answers requests, and the
trace lands in the client's logdir, where TensorBoard reads it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from inferd._proto import profiler_service_pb2 as pb
from inferd._proto import profiler_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, launch
from tests.models import write_tf1_half_plus_two


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("profiler")
    write_tf1_half_plus_two(root / "half" / "1")
    process = launch(root, f"--model_base_path={root / 'half'}", "--model_name=half")
    process.wait_available("half", 120)
    yield process
    process.stop()


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[pb_grpc.ProfilerServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.ProfilerServiceStub(channel)


def _predict_until(server: ServerProcess, done: threading.Event) -> None:
    while not done.is_set():
        body = {"instances": [[2.0]]}
        answer = requests.post(f"{server.url}/v1/models/half:predict", json=body, timeout=10)
        assert answer.json() == {"predictions": [[3.0]]}
        time.sleep(0.02)


def test_tensorflows_client_traces_the_server_into_its_logdir(server: ServerProcess, tmp_path: Path) -> None:
    done = threading.Event()
    load = threading.Thread(target=_predict_until, args=(server, done))
    load.start()
    try:
        tf.profiler.experimental.client.trace(f"grpc://{server.grpc_target}", str(tmp_path), 1000)
    finally:
        done.set()
        load.join()
    port = server.grpc_target.rsplit(":", 1)[1]
    (trace,) = (tmp_path / "plugins" / "profile").glob(f"*/127.0.0.1_{port}.xplane.pb")
    space = xplane_pb2.XSpace.FromString(trace.read_bytes())
    host = next(plane for plane in space.planes if plane.name == "/host:CPU")
    names = {meta.name for meta in host.event_metadata.values()}
    assert sum(len(line.events) for line in host.lines) > 0
    assert any("SessionRun" in name for name in names), sorted(names)[:20]


def test_a_trace_with_no_event_is_empty(stub: pb_grpc.ProfilerServiceStub) -> None:
    """Nothing ran TensorFlow in the window: the answer says so and carries no file, as
    TensorFlow's server answers (the client then retries or reports "no trace event")."""
    answer = stub.Profile(pb.ProfileRequest(duration_ms=200, session_id="idle"), timeout=30)
    assert answer.empty_trace
    assert not answer.tool_data


def test_one_profile_at_a_time_and_terminate_ends_it(stub: pb_grpc.ProfilerServiceStub) -> None:
    sixty = pb.ProfileRequest(opts=pb.ProfileOptions(version=1, duration_ms=60_000), session_id="long")
    long = stub.Profile.future(sixty, timeout=60)
    deadline = time.monotonic() + 10
    while True:  # until the long one is running
        if long.done():  # refused, while one of the short ones below ran
            long = stub.Profile.future(sixty, timeout=60)
        try:
            stub.Profile(pb.ProfileRequest(duration_ms=1, session_id="second"), timeout=10)
        except grpc.RpcError as error:
            refusal = error
            break
        assert time.monotonic() < deadline, "the 60 s profile never started"
    assert refusal.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'long'" in refusal.details()
    started = time.monotonic()
    stub.Terminate(pb.TerminateRequest(session_id="other"), timeout=10)  # not the running one
    assert not long.done()
    stub.Terminate(pb.TerminateRequest(session_id="long"), timeout=10)
    long.result(timeout=30)
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ProfileRequest(session_id="zero"), "duration_ms"),
        (pb.ProfileRequest(duration_ms=3_600_000), "duration_ms"),
        (
            pb.ProfileRequest(
                duration_ms=10, opts=pb.ProfileOptions(start_timestamp_ns=time.time_ns() + 10**13)
            ),
            "start_timestamp_ns",
        ),
    ],
)
def test_out_of_range_requests_are_refused(
    stub: pb_grpc.ProfilerServiceStub, request_: pb.ProfileRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Profile(request_, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in refused.value.details()


def test_monitor_is_unimplemented_as_in_tensorflows_server(stub: pb_grpc.ProfilerServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Monitor(pb.MonitorRequest(duration_ms=10), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
