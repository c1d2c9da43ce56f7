"""Protocol-neutral values shared by every layer: model ids, tensor specs, requests, responses.

Tensors are numpy arrays. Strings (TF's DT_STRING, V2's BYTES) are object arrays holding
``bytes`` or ``str``. The dtype table below is the one place that names a dtype in each dialect.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Tensors = dict[str, np.ndarray]
"""Named tensors, batched along axis 0."""

DEFAULT_SIGNATURE = "serving_default"

ACCEPTED_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b", "O": "OUS"}
"""Signature dtype kind -> the numpy kinds of decoded values it accepts: ints are accepted as
floats, and strings (object, ``str`` or ``bytes`` arrays) as BYTES / DT_STRING."""


@dataclass(frozen=True, slots=True)
class DType:
    """One tensor element type, as numpy, TensorFlow and the Open Inference Protocol name it."""

    numpy: np.dtype[Any]
    tf: str
    v2: str


_DTYPES = (
    DType(np.dtype(np.float32), "DT_FLOAT", "FP32"),
    DType(np.dtype(np.float64), "DT_DOUBLE", "FP64"),
    DType(np.dtype(np.float16), "DT_HALF", "FP16"),
    DType(np.dtype(np.int8), "DT_INT8", "INT8"),
    DType(np.dtype(np.int16), "DT_INT16", "INT16"),
    DType(np.dtype(np.int32), "DT_INT32", "INT32"),
    DType(np.dtype(np.int64), "DT_INT64", "INT64"),
    DType(np.dtype(np.uint8), "DT_UINT8", "UINT8"),
    DType(np.dtype(np.uint16), "DT_UINT16", "UINT16"),
    DType(np.dtype(np.uint32), "DT_UINT32", "UINT32"),
    DType(np.dtype(np.uint64), "DT_UINT64", "UINT64"),
    DType(np.dtype(np.bool_), "DT_BOOL", "BOOL"),
    DType(np.dtype(object), "DT_STRING", "BYTES"),
)
_BY_NUMPY = {d.numpy: d for d in _DTYPES}
_BY_NAME = {name: d for d in _DTYPES for name in (d.tf, d.v2, str(d.numpy))} | {
    "string": _BY_NUMPY[np.dtype(object)],
    "bytes": _BY_NUMPY[np.dtype(object)],
}


def dtype_of(value: np.dtype[Any] | str) -> DType:
    """Look a dtype up by numpy dtype or by any of its names (``float32``, ``DT_FLOAT``, ``FP32``).

    Raises:
        KeyError: the dtype has no entry in the table (e.g. complex numbers).
    """
    if isinstance(value, str):
        return _BY_NAME[value]
    if value.kind in "US":
        return _BY_NUMPY[np.dtype(object)]
    return _BY_NUMPY[np.dtype(value)]


def integer_range_error(name: str, value: np.ndarray, target: np.dtype[Any]) -> str | None:
    """Why integer ``value`` cannot be cast to integer dtype ``target`` without wrapping, or None.

    The one range rule every decoder applies before ``astype``: numpy casts wrap silently (300
    becomes 44 in INT8), and TF Serving refuses such values. The message names input ``name``,
    the datatype, its range and the first value outside it. Non-integer ``value`` or ``target``
    and empty arrays pass (None).
    """
    if value.dtype.kind not in "iu" or target.kind not in "iu" or not value.size:
        return None
    info = np.iinfo(target)
    if np.can_cast(value.dtype, target):
        return None
    outside = (value < info.min) | (value > info.max)
    if not outside.any():
        return None
    bad = value.reshape(-1)[int(np.argmax(outside.reshape(-1)))]
    return (
        f"input {name!r}: value {int(bad)} is out of range for {dtype_of(target).v2} [{info.min}, {info.max}]"
    )


def _infinities(dtype: type[np.floating[Any]]) -> tuple[bytes, bytes]:
    both = np.array([np.inf, -np.inf], dtype=dtype).tobytes()
    return both[: len(both) // 2], both[len(both) // 2 :]


_INFINITIES = {np.dtype(np.float32): _infinities(np.float32), np.dtype(np.float16): _infinities(np.float16)}
"""The bytes of +inf and -inf in the float dtypes a cast can overflow into."""

# A JSON number past a float input's range is read as an infinity (TF Serving's and V2 JSON
# readers), a cast between declared dtypes refuses it (``float_range_error``): numpy's warning about
# either would only clutter the log.
warnings.filterwarnings(
    "ignore",
    "overflow encountered in cast",
    RuntimeWarning,
    "inferd[.](service|protocols[.](tfserving_rest|v2_rest))$",
)


def may_hold_infinity(cast: np.ndarray) -> bool:
    """Whether ``cast``, an array just cast to FP32 or FP16, may hold an infinity: a filter in
    front of ``float_range_error`` that finds the pattern in the array's bytes (an infinity, or
    rarely parts of two neighbours), where a numpy reduction would cost each such request several
    us (docs/performance.md, "Where the time goes"). False for other dtypes, which no cast
    overflows."""
    patterns = _INFINITIES.get(cast.dtype)
    if patterns is None:
        return False
    raw = cast.tobytes()
    return patterns[0] in raw or patterns[1] in raw


def float_range_error(name: str, value: np.ndarray, cast: np.ndarray) -> str | None:
    """Why ``cast``, numeric ``value`` cast to a float dtype, does not hold ``value``, or None.

    For a tensor of another declared dtype than its input's (V2 ``FP64`` data or TF Serving gRPC
    ``DT_DOUBLE`` for an FP32 input), which Triton and TF Serving refuse outright and inferd casts:
    numpy's cast would make a finite value past the float dtype's range an infinity (1e300 in
    FP32). The message names input ``name``, the datatype, its largest value and the first finite
    value that became an infinity. Casts to other dtypes pass (None). JSON numbers are not cast
    here: the protocol readers make them the input's dtype, infinities included, as the peers do.
    """
    if cast.dtype.kind != "f" or value.dtype.kind not in "iuf" or np.isfinite(cast).all():
        return None
    overflowed = np.isinf(cast) & np.isfinite(value)
    if not overflowed.any():
        return None
    bad = value.reshape(-1)[int(np.argmax(overflowed.reshape(-1)))]
    return (
        f"input {name!r}: datatype {dtype_of(cast.dtype).v2} cannot hold {bad.item()!r} "
        f"(largest: {np.finfo(cast.dtype).max})"
    )


@dataclass(frozen=True, slots=True)
class ModelId:
    """One version of one model."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What a request asks for: a model and, at most one of, a version or a label.

    With neither, the highest AVAILABLE version answers.
    """

    name: str
    version: int | None = None
    label: str | None = None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared tensor: name, element type and shape, with -1 for a free dimension.

    ``shape`` None means the rank itself is unknown. ``tensor_name`` is the graph's name for the
    tensor (``x:0``) where the runtime has one, as TF Serving's metadata shows it; else "".
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...] | None
    tensor_name: str = ""

    def describe(self) -> str:
        """``FP32 [-1, 64]``: the form error messages use."""
        shape = "[?]" if self.shape is None else f"[{', '.join(map(str, self.shape))}]"
        return f"{dtype_of(self.dtype).v2} {shape}"


class Method(enum.StrEnum):
    """What a signature computes, in TF Serving's terms."""

    PREDICT = "tensorflow/serving/predict"
    CLASSIFY = "tensorflow/serving/classify"
    REGRESS = "tensorflow/serving/regress"


@dataclass(frozen=True, slots=True)
class Signature:
    """A named function of a model: its inputs, outputs and method.

    A CLASSIFY signature has outputs ``classes`` and ``scores``; a REGRESS one has ``outputs``.
    ``runtime_checks_shapes``: the runtime judges input shapes itself (TensorFlow graphs, whose
    declared shapes are hints TF Serving does not enforce), so inferd checks names and dtypes only.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    method: Method = Method.PREDICT
    runtime_checks_shapes: bool = False

    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """Input tensors for one call of one signature, decoded from any protocol."""

    inputs: Tensors
    signature_name: str = DEFAULT_SIGNATURE
    id: str | None = None
    deadline: float | None = None
    """``time.monotonic()`` after which the request is dropped rather than computed."""


@dataclass(frozen=True, slots=True)
class InferenceResponse:
    """Output tensors, the version that computed them, and where the time went."""

    model_id: ModelId
    outputs: Tensors
    id: str | None = None
    queue_s: float = 0.0
    predict_s: float = 0.0
    features_s: float = 0.0
    batch_rows: int = 0
    """Rows of the batch the model computed this answer in (0: not computed, e.g. cached)."""


class VersionState(enum.IntEnum):
    """Lifecycle of a version, numbered as TF Serving numbers it."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """Where one version stands; ``error_code`` is an ErrorCode name, ``OK`` when none."""

    version: int
    state: VersionState
    error_code: str = "OK"
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What a client may learn of a served version: its id, signatures and runtime, the
    model's AVAILABLE versions, its largest batch (0 when it is not batched) and the device it
    computes on (``cpu`` or ``cuda:N``)."""

    model_id: ModelId
    signatures: Mapping[str, Signature]
    platform: str
    versions: tuple[int, ...] = ()
    max_batch_size: int = 0
    device: str = "cpu"
