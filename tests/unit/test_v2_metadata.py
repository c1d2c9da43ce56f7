"""The V2 API serves a model's ``serving_default`` signature: its metadata and configuration, on
REST and gRPC, of a model without one (a SavedModel of named signatures only) are refused with
the inference's INVALID_ARGUMENT, not answered INTERNAL after a KeyError."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from inferd._proto import grpc_service_pb2 as pb
from inferd.config import ServerConfig
from inferd.errors import InvalidArgument
from inferd.protocols import v2_grpc, v2_rest
from inferd.protocols.limits import RequestLimits
from inferd.protocols.v2 import v2_model_config
from inferd.types import ModelId, ModelMetadata, Signature, TensorSpec

SPEC = TensorSpec("x", np.dtype(np.float32), (-1, 2))
META = ModelMetadata(ModelId("named", 1), {"double": Signature("double", (SPEC,), (SPEC,))}, "tensorflow")
REFUSAL = r'"serving_default" not found in signature def; model named:1 has \[\'double\'\]'


class _Service:
    def metadata(self, ref: Any) -> ModelMetadata:
        return META


def test_rest_metadata_and_config_refuse_a_model_without_serving_default() -> None:
    with pytest.raises(InvalidArgument, match=REFUSAL):
        v2_rest._metadata(META)
    with pytest.raises(InvalidArgument, match=REFUSAL):
        v2_model_config(META)


def test_grpc_metadata_refuses_a_model_without_serving_default() -> None:
    servicer = v2_grpc.InferenceServicer(_Service(), None, RequestLimits.of(ServerConfig()))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=REFUSAL):
        asyncio.run(servicer._metadata(pb.ModelMetadataRequest(name="named")))
