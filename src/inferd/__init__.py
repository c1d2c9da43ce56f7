"""inferd: a model server that speaks TensorFlow Serving's APIs and serves any framework."""

from inferd.errors import ErrorCode, InferdError
from inferd.types import (
    InferenceRequest,
    InferenceResponse,
    ModelId,
    ModelRef,
    Signature,
    TensorSpec,
    VersionState,
)

__all__ = [
    "ErrorCode",
    "InferdError",
    "InferenceRequest",
    "InferenceResponse",
    "ModelId",
    "ModelRef",
    "Signature",
    "TensorSpec",
    "VersionState",
]
__version__ = "0.1.0"
