"""Rows for calibration and checks, read from ``--calibration`` with ``inferd batch``'s readers:
a CSV, Parquet, JSONL or ``.npy`` file (or a folder or glob of them), columns mapped to inputs by
name as ``inferd batch`` maps them."""

from __future__ import annotations

import numpy as np

from inferd.errors import InvalidArgument
from inferd.offline.sources import find_inputs, plan_layout, read_chunks
from inferd.optimize.convert import Unsupported
from inferd.types import Signature, Tensors, TensorSpec

CALIBRATION_ROWS = 1000
"""Rows of ``--calibration`` used at most."""


class Calibration:
    """The ``--calibration`` rows, read once for each set of inputs they are read for."""

    def __init__(self, spec: str | None) -> None:
        self._spec = spec
        self._read: dict[tuple[TensorSpec, ...], Tensors] = {}

    @property
    def given(self) -> bool:
        return self._spec is not None

    def rows(self, signature: Signature) -> Tensors:
        """Up to ``CALIBRATION_ROWS`` rows shaped and typed for ``signature``'s inputs.

        Raises:
            Unsupported: no ``--calibration`` was given.
            InvalidArgument: the file does not fit the signature, or a row is bad.
        """
        if self._spec is None:
            raise Unsupported("this variant needs calibration rows: give --calibration FILE")
        if signature.inputs not in self._read:
            self._read[signature.inputs] = _read_rows(self._spec, signature, CALIBRATION_ROWS)
        return self._read[signature.inputs]


def _read_rows(spec: str, signature: Signature, limit: int) -> Tensors:
    files, kind = find_inputs(spec)
    try:
        layout = plan_layout(signature, files, kind, None, ())
    except InvalidArgument as exc:
        raise InvalidArgument(f"--calibration {exc.message}") from None
    parts: list[Tensors] = []
    count = 0
    for chunk in read_chunks(layout, signature, min(limit, 4096)):
        if chunk.rejects:
            bad = chunk.rejects[0]
            raise InvalidArgument(f"--calibration {bad.file}: row {bad.row}: {bad.error}")
        parts.append(chunk.inputs)
        count += len(chunk.ids)
        if count >= limit:
            break
    if not count:
        raise InvalidArgument(f"--calibration {spec}: no rows")
    rows = {name: np.concatenate([p[name] for p in parts])[:limit] for name in signature.input_names()}
    for tensor in signature.inputs:
        shape = rows[tensor.name].shape
        if tensor.shape is not None and (
            len(shape) != len(tensor.shape)
            or any(d not in (-1, n) for d, n in zip(tensor.shape, shape, strict=True))
        ):
            raise InvalidArgument(
                f"--calibration {spec}: input {tensor.name!r} expects {tensor.describe()}, "
                f"got rows of shape {list(shape)}"
            )
    return rows
