"""End to end: a version folder numbered past int64 is ignored, as TF Serving ignores it, instead
of becoming the latest version, retiring version 1 and breaking TF Serving's gRPC answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from inferd._proto import model_service_pb2 as ms
from inferd._proto import model_service_pb2_grpc as ms_grpc
from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from inferd._proto.types_pb2 import DT_FLOAT
from tests.conftest import ServerProcess
from tests.models import write_onnx_affine

PAST_INT64 = str(2**63)


def test_version_past_int64_is_ignored(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    base = tmp_path / "affine"
    write_onnx_affine(base / "1", scale=2.0)
    server = start_server("--model_name=affine", f"--model_base_path={base}")
    server.wait_for(lambda: server.status("affine") == {"1": "AVAILABLE"}, "version 1")

    write_onnx_affine(base / PAST_INT64, scale=3.0)
    warning = f"ignoring {base / PAST_INT64}"
    server.wait_for(lambda: warning in server.log(), "the warning about the folder")
    write_onnx_affine(base / "0002", scale=5.0)  # leading zeros are a version, as in TF Serving
    server.wait_for(lambda: server.status("affine") == {"2": "AVAILABLE", "1": "END"}, "version 2")
    assert server.log().count(warning) == 1  # many scans later, still one line

    with grpc.insecure_channel(server.grpc_target) as channel:
        predict = ps.PredictRequest()
        predict.model_spec.name = "affine"
        tensor = predict.inputs["x"]
        tensor.dtype = DT_FLOAT
        tensor.tensor_shape.dim.add(size=1)
        tensor.tensor_shape.dim.add(size=4)
        tensor.float_val.extend([1.0, 1.0, 1.0, 1.0])
        reply = ps_grpc.PredictionServiceStub(channel).Predict(predict, timeout=10)
        assert reply.model_spec.version.value == 2
        (output,) = reply.outputs.values()
        np.testing.assert_allclose(np.frombuffer(output.tensor_content, np.float32), [5.0] * 4)

        status = ms.GetModelStatusRequest()
        status.model_spec.name = "affine"
        answer = ms_grpc.ModelServiceStub(channel).GetModelStatus(status, timeout=10)
        assert sorted(v.version for v in answer.model_version_status) == [1, 2]

        metadata = ps.GetModelMetadataRequest(metadata_field=["signature_def"])
        metadata.model_spec.name = "affine"
        described = ps_grpc.PredictionServiceStub(channel).GetModelMetadata(metadata, timeout=10)
        assert described.model_spec.version.value == 2
