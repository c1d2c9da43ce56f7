"""A large gRPC message does not hold the other calls: while one Predict or ModelInfer of 60 MiB
of typed values (``float_val``, ``fp32_contents``) is parsed and decoded, or a Predict answer of
60 MiB is written into ``float_val``, health checks keep being answered; a large message that is
bad still answers INVALID_ARGUMENT.

The large call is sent from another process, so that its client's own work (building and
copying the message, which holds that process's GIL) cannot delay the health checks timed here.
Before its decoding left the event loop, a health check waited 1.1 s behind a ``float_val``
Predict of this size on the development machine; since, at most about 0.12 s (docs/performance.md).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto.tensor_pb2 import TensorProto
from inferd._proto.types_pb2 import DT_FLOAT
from tests.conftest import ServerProcess, launch
from tests.models import write_python_model

WIDTH = 1024
ROWS = 15 * 1024  # 60 MiB of float32
STALL_BOUND_S = 0.4
STALL_SHARE = 0.6
"""A health check may wait ``STALL_BOUND_S``, or this share of the large call's time where the
machine is loaded enough to stretch both (measured on a 2-core machine, the test's processes on
one core beside a CI run: before, a check waited 0.67-1.83 s, 75-94% of the call; after,
0.11-0.32 s, and up to 0.8 s, under half of the call, when that core was busiest)."""

FIRST_COLUMN = """
def load(self):
    pass

def predict(self, inputs):
    return {"y": inputs["x"][:, :1].copy()}
"""
SIGNATURE = (
    f'{{"inputs": [{{"name": "x", "dtype": "float32", "shape": [-1, {WIDTH}]}}], '
    '"outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1]}]}'
)
TILE = f"""
import numpy as np

def load(self):
    pass

def predict(self, inputs):
    return {{"y": np.repeat(inputs["x"], {ROWS}, axis=0)}}
"""
TILE_SIGNATURE = SIGNATURE.replace("[-1, 1]", f"[-1, {WIDTH}]")
SCORES = FIRST_COLUMN.replace('"y"', '"scores"')  # a predict signature that Classify takes
SCORES_SIGNATURE = (
    '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1]}], '
    '"outputs": [{"name": "scores", "dtype": "float32", "shape": [-1, 1]}]}'
)

SENDER = f"""
import sys
import time
import grpc
import numpy as np
from inferd._proto import grpc_service_pb2 as pb
from inferd._proto import prediction_service_pb2 as ps
from inferd._proto.types_pb2 import DT_FLOAT

target, method, model = sys.argv[1:]
x = np.arange({ROWS} * {WIDTH}, dtype=np.float32) % 1000
if method.endswith("Classify"):  # one example of every value
    request = ps.ClassificationRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_default"  # a predict signature with scores
    request.input.example_list.examples.add().features.feature["x"].float_list.value.extend(x)
elif method.endswith("Predict"):
    request = ps.PredictRequest()
    request.model_spec.name = model
    tensor = request.inputs["x"]
    tensor.dtype = DT_FLOAT
    if model == "tile":  # one row in: the answer is what is large
        tensor.tensor_shape.dim.add(size=1)
        tensor.tensor_shape.dim.add(size={WIDTH})
        tensor.tensor_content = x[:{WIDTH}].tobytes()
    else:
        tensor.tensor_shape.dim.add(size={ROWS})
        tensor.tensor_shape.dim.add(size={WIDTH})
        tensor.float_val.extend(x)
else:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[{ROWS}, {WIDTH}])
    tensor.contents.fp32_contents.extend(x)
data = request.SerializeToString()
options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
with grpc.insecure_channel(target, options=options) as channel:
    call = channel.unary_unary(method)  # the answer's bytes: the time taken is the server's
    print("sending", flush=True)
    started = time.perf_counter()
    call(data, timeout=60)
print("answered in", time.perf_counter() - started, flush=True)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("grpc_large")
    write_python_model(repo / "wide" / "1", FIRST_COLUMN, SIGNATURE)
    write_python_model(repo / "tile" / "1", TILE, TILE_SIGNATURE)
    write_python_model(repo / "scores" / "1", SCORES, SCORES_SIGNATURE)
    process = launch(repo, str(repo))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(server.grpc_target, options=options) as channel:
        yield channel


@pytest.mark.parametrize(
    ("method", "model"),
    [
        ("/tensorflow.serving.PredictionService/Predict", "wide"),
        ("/inference.GRPCInferenceService/ModelInfer", "wide"),
        ("/tensorflow.serving.PredictionService/Predict", "tile"),  # a large answer
        ("/tensorflow.serving.PredictionService/Classify", "scores"),
    ],
)
def test_health_checks_are_answered_while_a_large_message_is_decoded(
    server: ServerProcess, channel: grpc.Channel, method: str, model: str
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest()
    health.Check(check, timeout=10)
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, server.grpc_target, method, model],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sender.stdout is not None
        assert sender.stdout.readline() == "sending\n", sender.communicate()[1]
        waits: list[float] = []
        while sender.poll() is None:
            started = time.perf_counter()
            health.Check(check, timeout=10)
            waits.append(time.perf_counter() - started)
            time.sleep(0.005)
        out, err = sender.communicate()
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert sender.returncode == 0, err
    assert out.startswith("answered in "), out
    took = float(out.split()[-1])
    assert waits, "the large call ended before a health check was sent"
    assert max(waits) < max(STALL_BOUND_S, STALL_SHARE * took), (
        f"a health check waited {max(waits):.3f} s (of {len(waits)}) behind a call of {took:.3f} s"
    )


def _wide_request(rows: int) -> ps.PredictRequest:
    request = ps.PredictRequest()
    request.model_spec.name = "wide"
    tensor: TensorProto = request.inputs["x"]
    tensor.dtype = DT_FLOAT
    tensor.tensor_shape.dim.add(size=rows)
    tensor.tensor_shape.dim.add(size=WIDTH)
    return request


def test_a_large_message_that_does_not_parse_is_invalid(channel: grpc.Channel) -> None:
    request = _wide_request(64)
    request.inputs["x"].tensor_content = np.ones((64, WIDTH), np.float32).tobytes()
    # then model_spec (field 1) again, its name (field 1) one byte that is not UTF-8
    data = request.SerializeToString() + b"\x0a\x03\x0a\x01\xff"
    predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    with pytest.raises(grpc.RpcError) as caught:
        predict(data, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid" in (caught.value.details() or "")


def test_large_typed_values_that_do_not_fill_the_shape_are_invalid(channel: grpc.Channel) -> None:
    request = _wide_request(128)
    request.inputs["x"].float_val.extend(np.ones(128 * WIDTH - 1, np.float32))
    predict = channel.unary_unary(
        "/tensorflow.serving.PredictionService/Predict",
        request_serializer=ps.PredictRequest.SerializeToString,
    )
    with pytest.raises(grpc.RpcError) as caught:
        predict(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 131072 values in float_val" in (caught.value.details() or "")


def test_a_large_message_is_answered_in_full(channel: grpc.Channel) -> None:
    x = np.random.default_rng(0).random((128, WIDTH), dtype=np.float32)
    request = _wide_request(128)
    request.inputs["x"].float_val.extend(x.reshape(-1))
    predict = channel.unary_unary(
        "/tensorflow.serving.PredictionService/Predict",
        request_serializer=ps.PredictRequest.SerializeToString,
        response_deserializer=ps.PredictResponse.FromString,
    )
    reply = predict(request, timeout=30)
    np.testing.assert_array_equal(np.asarray(reply.outputs["y"].float_val), x[:, 0])
