"""The Open Inference Protocol's (KServe V2) vocabulary, shared by its REST and gRPC adapters:
platforms, extensions, datatypes, repository index rows and model configuration."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

from inferd.control import IndexEntry
from inferd.errors import InvalidArgument
from inferd.types import DEFAULT_SIGNATURE, ModelMetadata, Signature, TensorSpec, VersionState, dtype_of

V2_PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "sklearn": "sklearn",
    "python": "python",
    "tensorflow": "tensorflow_savedmodel",
    "torch": "pytorch_libtorch",
}
"""Runtime name -> the ``platform`` the Open Inference Protocol reports."""

V2_EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "parameters", "statistics")
"""What ``GET /v2`` and ServerMetadata advertise (binary_tensor_data is HTTP's raw-bytes twin of
gRPC's raw contents)."""

V2_DATATYPES = (
    *("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"),
    *("FP16", "FP32", "FP64", "BYTES"),
)
"""The Open Inference Protocol's datatype names."""

_TRITON_STATES = {
    VersionState.START: "LOADING",
    VersionState.LOADING: "LOADING",
    VersionState.AVAILABLE: "READY",
    VersionState.UNLOADING: "UNLOADING",
    VersionState.END: "UNAVAILABLE",
}


UNSERVED_PARAMETERS = {
    "classification": "Triton's classification extension (class_count)",
    "shared_memory_region": "shared memory",
    "sequence_id": "sequence batching",
}
"""Triton request parameters that ask for what inferd does not serve, and what they ask for."""


BRIEF_CHARS = 40
"""How much of a request's value an error message shows."""


def brief(value: Any, render: Callable[[Any], str] = repr) -> str:
    """A request's JSON value for an error message: ``render(value)`` cut to ``BRIEF_CHARS``
    characters (with ``...`` after a cut). Only as much of the value is rendered as those
    characters can show, so that a huge or deeply nested value costs no more than a small one,
    and renders alike on every Python (a whole ``repr`` of a list nested 1,000 levels, which
    orjson reads, overflows the stack on 3.11 and not on 3.12)."""
    text = render(_clipped(value, BRIEF_CHARS + 1))
    return text if len(text) <= BRIEF_CHARS else f"{text[:BRIEF_CHARS]}..."


def _clipped(value: Any, room: int) -> Any:
    """``value`` (JSON: dicts, lists, strings, numbers, booleans, None) cut to what the first
    ``room`` characters of its rendering show: its first ``room`` values in the order they are
    rendered (containers included, the rest left out), strings and keys cut to ``room``
    characters. Each value renders to a character or more, so the one numbered ``k`` starts at
    character ``k - 1`` or later: what is left out lies past the first ``room - 1``, and a value
    that was cut renders to ``room`` characters or more."""
    left = room

    def clip(item: Any) -> Any:
        nonlocal left
        left -= 1
        if isinstance(item, str):
            return item[:room]
        if isinstance(item, list):
            return [clip(inner) for inner in itertools.takewhile(lambda _: left > 0, item)]
        if isinstance(item, dict):
            pairs = itertools.takewhile(lambda _: left > 0, item.items())
            return {key[:room] if isinstance(key, str) else key: clip(inner) for key, inner in pairs}
        return item

    return clip(value)


def refuse_unserved(where: str, parameters: Mapping[str, Any]) -> None:
    """Refuse ``parameters`` (of the request, an input or an output: ``where``) that ask for a
    Triton feature inferd does not serve, rather than answer as if they were not there. Zero or
    empty values ask for nothing, as Triton reads them.

    Raises:
        InvalidArgument: naming the parameter and the feature.
    """
    if not parameters:
        return
    for key, feature in UNSERVED_PARAMETERS.items():
        if parameters.get(key):
            raise InvalidArgument(
                f"{where}: parameter {key!r} asks for {feature}, which inferd does not serve"
            )


def v2_index(entries: list[IndexEntry]) -> list[dict[str, str]]:
    """The model repository index as V2 rows: name, version, Triton's state, and the reason."""
    rows = []
    for entry in entries:
        row = {"name": entry.name, "version": entry.version}
        row["state"] = "UNAVAILABLE" if entry.state is None else _TRITON_STATES[entry.state]
        if entry.reason:
            row["reason"] = entry.reason
        rows.append(row)
    return rows


def v2_signature(meta: ModelMetadata) -> Signature:
    """The signature the V2 API serves: the model's ``serving_default``.

    Raises:
        InvalidArgument: the model has none (a SavedModel of named signatures only), in the
            words of an inference request on it.
    """
    signature = meta.signatures.get(DEFAULT_SIGNATURE)
    if signature is None:
        raise InvalidArgument(
            f'Serving signature name: "{DEFAULT_SIGNATURE}" not found in signature def; model '
            f"{meta.model_id} has {sorted(meta.signatures)}, and the V2 API serves {DEFAULT_SIGNATURE}"
        )
    return signature


def v2_model_config(meta: ModelMetadata) -> dict[str, Any]:
    """Triton's model configuration as perf_analyzer reads it (JSON field names of its
    ModelConfig proto): dims exclude the batch dimension when the model is batched
    (``max_batch_size`` > 0)."""
    signature = v2_signature(meta)
    batched = meta.max_batch_size > 0

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        dims = [-1] if spec.shape is None else list(spec.shape)
        return {
            "name": spec.name,
            "data_type": "TYPE_" + ("STRING" if spec.dtype.kind == "O" else dtype_of(spec.dtype).v2),
            "dims": dims[1:] if batched and dims else dims,
        }

    config: dict[str, Any] = {
        "name": meta.model_id.name,
        "platform": V2_PLATFORMS.get(meta.platform, meta.platform),
        "backend": meta.platform,
        "max_batch_size": meta.max_batch_size,
        "input": [tensor(spec) for spec in signature.inputs],
        "output": [tensor(spec) for spec in signature.outputs],
    }
    if batched:
        config["dynamic_batching"] = {}
    return config
