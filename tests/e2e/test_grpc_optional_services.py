"""The gRPC health and reflection services are optional: when their packages cannot be imported
(as when a later ``pip install`` of a client downgraded protobuf below the version they were
generated for), the server warns once and serves REST and gRPC without them."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from inferd._proto.tensor_pb2 import TensorProto
from inferd._proto.types_pb2 import DT_FLOAT
from tests.conftest import launch
from tests.models import write_onnx_affine

# Stand-ins, found first on the server's PYTHONPATH, that fail as the real packages do when
# they were generated for another protobuf major version (or are missing).
BROKEN_HEALTH = """
from google.protobuf.runtime_version import VersionError
raise VersionError("Detected mismatched Protobuf Gencode/Runtime major versions (test stand-in)")
"""
BROKEN_REFLECTION = 'raise ImportError("cannot import grpc_reflection (test stand-in)")\n'


def test_the_server_serves_rest_and_grpc_when_health_and_reflection_cannot_be_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shadow = tmp_path / "shadow"
    # The top-level packages import (grpc itself imports them); their service modules fail.
    for module, body in (
        ("grpc_health/v1/health", BROKEN_HEALTH),
        ("grpc_reflection/v1alpha/reflection", BROKEN_REFLECTION),
    ):
        path = shadow / f"{module}.py"
        path.parent.mkdir(parents=True)
        for folder in (path.parent, path.parent.parent):
            (folder / "__init__.py").write_text("")
        path.write_text(body)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))
    )
    write_onnx_affine(tmp_path / "repo" / "affine" / "1", scale=2.0)
    server = launch(tmp_path, str(tmp_path / "repo"))
    try:
        rows = [[1.0, 2.0, 3.0, 4.0]]
        rest = requests.post(f"{server.url}/v1/models/affine:predict", json={"instances": rows}, timeout=10)
        assert rest.status_code == 200, rest.text
        assert rest.json() == {"predictions": [[2.0, 4.0, 6.0, 8.0]]}

        with grpc.insecure_channel(server.grpc_target) as channel:
            request = ps.PredictRequest()
            request.model_spec.name = "affine"
            request.inputs["x"].CopyFrom(
                TensorProto(
                    dtype=DT_FLOAT,
                    tensor_shape={"dim": [{"size": 1}, {"size": 4}]},
                    float_val=rows[0],
                )
            )
            reply = ps_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)  # type: ignore[no-untyped-call]
            served = np.frombuffer(reply.outputs["y"].tensor_content, np.float32)
            np.testing.assert_array_equal(served, [2.0, 4.0, 6.0, 8.0])
            with pytest.raises(grpc.RpcError) as missing:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED

        client = grpcclient.InferenceServerClient(server.grpc_target)
        tensor = grpcclient.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.asarray(rows, np.float32))
        result = client.infer("affine", [tensor])
        np.testing.assert_array_equal(result.as_numpy("y"), [[2.0, 4.0, 6.0, 8.0]])
        client.close()
    finally:
        server.stop()
    log = server.log()
    assert (
        log.count("serving gRPC without the health service: grpcio-health-checking cannot be imported") == 1
    )
    assert "VersionError: Detected mismatched Protobuf" in log
    assert log.count("serving gRPC without server reflection: grpcio-reflection cannot be imported") == 1
    assert "Traceback" not in log
