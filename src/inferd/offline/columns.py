"""Arrow columns to input tensors, row by row where a value does not parse.

Each function returns the tensor for every row (a placeholder where the row is bad) and records
the bad rows, by row offset, with a message naming the column and the value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from inferd.types import TensorSpec


def row_width(spec: TensorSpec) -> int:
    """Values per row of an input of shape [-1] or [-1, k] (0 when the shape does not say)."""
    if spec.shape is None or not spec.shape or any(d < 0 for d in spec.shape[1:]):
        return 0
    return math.prod(spec.shape[1:])


def column_tensor(
    spec: TensorSpec, table: pa.Table, columns: tuple[str, ...]
) -> tuple[np.ndarray, dict[int, str]]:
    """One input from its columns, with the rows whose values are missing or do not parse."""
    target = spec.dtype if spec.dtype.kind in "biuf" else np.dtype(object)
    bad: dict[int, str] = {}
    value: np.ndarray | None = None
    for i, name in enumerate(columns):
        chunks = table.column(name)
        column = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
        if _is_list(column.type):
            part = _list_column(spec, name, column, target, bad)
        else:
            part = _scalar_column(name, column, target, bad)
        if len(columns) == 1:
            value = part
        else:
            # Column by column into the row-major tensor: a third faster than np.stack(axis=1).
            if value is None:
                value = np.empty((len(part), len(columns), *part.shape[1:]), dtype=part.dtype)
            value[:, i] = part
    assert value is not None
    if spec.shape is not None and len(spec.shape) >= 2 and value.ndim == 1:
        value = value.reshape(-1, *[max(d, 1) for d in spec.shape[1:]])
    elif spec.shape is not None and value.ndim >= 2 and len(spec.shape) != value.ndim:
        value = value.reshape(-1, *[d for d in spec.shape[1:]])
    return value, bad


def _scalar_column(name: str, column: pa.Array, target: np.dtype[Any], bad: dict[int, str]) -> np.ndarray:
    nulls = column.is_null()
    if column.null_count:
        for null in np.flatnonzero(np.asarray(nulls.to_numpy(zero_copy_only=False))):
            bad.setdefault(int(null), f"column {name!r}: missing value")
    if target.kind == "O":
        return np.asarray(column.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
    arrow_target = pa.from_numpy_dtype(target)
    if not column.null_count and column.type == arrow_target:
        return np.asarray(column.to_numpy(zero_copy_only=False))  # no copy for numbers without nulls
    try:
        cast = pc.cast(column, arrow_target) if column.type != arrow_target else column
        return np.asarray(cast.fill_null(0).to_numpy(zero_copy_only=False), dtype=target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # some value does not parse: find which, one at a time
    out = np.zeros(len(column), dtype=target)
    convert = float if target.kind == "f" else int
    for row, item in enumerate(column.to_pylist()):
        if item is None:
            continue
        try:
            out[row] = convert(item)
        except (TypeError, ValueError, OverflowError):
            bad.setdefault(row, f"column {name!r}: {item!r} is not a {target.name} value")
    return out


def _is_list(kind: pa.DataType) -> bool:
    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))


def _list_column(
    spec: TensorSpec, name: str, column: pa.Array, target: np.dtype[Any], bad: dict[int, str]
) -> np.ndarray:
    """A list column (``list``, ``large_list`` or ``fixed_size_list``, nested to any depth) as
    one tensor row per list.

    A column nested ``d`` deep feeds an input of inner shape ``dims`` when each of its first
    ``d - 1`` levels has ``dims[i]`` items and its last level holds the rest of the values: a
    flat list of 64 values, lists of 8 lists of 8, or 8 x 8 x 1 all feed ``[-1, 8, 8, 1]``. A
    free dimension takes the length of the first row. A row of other lengths, or with a missing
    list or value, is recorded in ``bad`` and left as zeros.
    """
    rows = len(column)
    levels = [column]
    while _is_list(levels[-1].type):
        levels.append(pc.list_flatten(levels[-1]))
    depth = len(levels) - 1
    # An input of shape [-1] takes lists of one value; one of unknown rank, lists of any length.
    dims = [-1] if spec.shape is None else list(spec.shape[1:]) or [1]
    if depth > len(dims):
        for row in range(rows):
            bad.setdefault(
                row, f"column {name!r}: lists nested {depth} deep for an input of {spec.describe()}"
            )
        return np.zeros((rows, *(max(d, 1) for d in dims)), dtype=target)
    rest = dims[depth - 1 :]
    wanted = [*dims[: depth - 1], math.prod(rest) if all(d >= 0 for d in rest) else -1]
    parents: dict[int, np.ndarray] = {}

    def rows_of(level: int, items: np.ndarray) -> np.ndarray:
        """The rows that items of ``levels[level]`` belong to."""
        for above in range(level - 1, -1, -1):
            if above not in parents:
                parents[above] = np.asarray(pc.list_parent_indices(levels[above]).to_numpy())
            items = parents[above][items]
        return items

    ok = np.ones(rows, dtype=bool)
    lengths_seen = []
    for level in range(depth):
        lengths = np.asarray(pc.list_value_length(levels[level]).fill_null(-1).to_numpy(zero_copy_only=False))
        want = wanted[level]
        if want < 0:  # a free dimension: the first list that is there sets it
            present = lengths[lengths >= 0]
            want = int(present[0]) if len(present) else 0
        lengths_seen.append(want)
        wrong = np.flatnonzero(lengths != want)
        for item, row in zip(wrong, rows_of(level, wrong), strict=True):
            if ok[row]:
                got = "a missing value" if lengths[item] < 0 else f"{lengths[item]} values"
                where = "" if level == 0 else f" at depth {level + 1}"
                bad.setdefault(int(row), f"column {name!r}: expected {want} values{where}, got {got}")
            ok[row] = False
    values = levels[-1]
    if values.null_count:
        nulls = np.flatnonzero(np.asarray(values.is_null().to_numpy(zero_copy_only=False)))
        for row in np.unique(rows_of(depth, nulls)):
            if ok[row]:
                bad.setdefault(int(row), f"column {name!r}: missing value")
            ok[row] = False
    if depth == len(dims):
        shape = [n if d < 0 else d for d, n in zip(dims, lengths_seen, strict=True)]
    else:  # the last level holds the rest of the dimensions, flattened
        shape = dims if all(d >= 0 for d in dims) else lengths_seen
    if ok.all():
        return _scalar_column(name, values, target, {}).reshape(rows, *shape)
    out = np.zeros((rows, *shape), dtype=target)
    kept = column.filter(pa.array(ok))
    for _ in range(depth):
        kept = pc.list_flatten(kept)
    out[ok] = _scalar_column(name, kept, target, {}).reshape(-1, *shape)
    return out
