"""Column mapping and conversion of ``inferd batch`` inputs, without a model process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inferd.errors import InvalidArgument
from inferd.offline.sources import find_inputs, plan_layout, read_chunks
from inferd.types import Signature, TensorSpec

WIDE = Signature("serving_default", (TensorSpec("x", np.dtype(np.float32), (-1, 3)),), ())
TWO = Signature(
    "serving_default",
    (TensorSpec("a", np.dtype(np.float32), (-1, 2)), TensorSpec("b", np.dtype(np.int64), (-1,))),
    (),
)


def write(path: Path, **columns: object) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_numbered_columns_a_list_column_and_scalar_columns_map_to_inputs(tmp_path: Path) -> None:
    write(tmp_path / "n.parquet", key=[7, 8], x_0=[1.0, 4.0], x_1=[2.0, 5.0], x_2=[3.0, 6.0], other=[0, 0])
    layout = plan_layout(WIDE, (tmp_path / "n.parquet",), "parquet", "key", ())
    assert layout.columns == {"x": ("x_0", "x_1", "x_2")}
    (chunk,) = read_chunks(layout, WIDE, 10)
    assert chunk.inputs["x"].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert chunk.ids.tolist() == [7, 8]

    write(tmp_path / "t.parquet", a=[[1.0, 2.0], [3.0], None], b=[1, 2, 3])
    layout = plan_layout(TWO, (tmp_path / "t.parquet",), "parquet", None, ())
    (chunk,) = read_chunks(layout, TWO, 10)
    assert chunk.inputs["a"].tolist() == [[1.0, 2.0]]
    assert chunk.inputs["b"].tolist() == [1]
    assert [(r.row, r.error) for r in chunk.rejects] == [
        (1, "column 'a': expected 2 values, got 1 values"),
        (2, "column 'a': expected 2 values, got a missing value"),
    ]


def test_chunks_number_rows_across_files_and_split_at_the_chunk_size(tmp_path: Path) -> None:
    for name, start in (("1.parquet", 0), ("2.parquet", 5)):
        write(tmp_path / name, a=[[float(i), 0.0] for i in range(start, start + 5)], b=list(range(5)))
    files, kind = find_inputs(str(tmp_path / "*.parquet"))
    chunks = list(read_chunks(plan_layout(TWO, files, kind, None, ()), TWO, 2))
    assert [c.index for c in chunks] == list(range(6))
    assert [c.rows for c in chunks] == [2, 2, 1, 2, 2, 1]
    assert np.concatenate([c.ids for c in chunks]).tolist() == list(range(10))
    assert np.concatenate([c.inputs["a"][:, 0] for c in chunks]).tolist() == [float(i) for i in range(10)]


def test_inputs_that_cannot_feed_the_model_are_refused_before_reading(tmp_path: Path) -> None:
    write(tmp_path / "x.parquet", x_0=[1.0], x_1=[2.0])
    with pytest.raises(InvalidArgument, match=r"input 'x' \(FP32 \[-1, 3\]\): missing column"):
        plan_layout(WIDE, (tmp_path / "x.parquet",), "parquet", None, ())
    np.save(tmp_path / "x.npy", np.zeros((2, 2)))
    with pytest.raises(InvalidArgument, match="mixes formats"):
        find_inputs(str(tmp_path))
    with pytest.raises(InvalidArgument, match="npy input feeds one tensor"):
        plan_layout(TWO, (tmp_path / "x.npy",), "npy", None, ())
    with pytest.raises(InvalidArgument, match="no input files"):
        find_inputs(str(tmp_path / "nothing-*.csv"))


def test_npy_rows_are_read_by_ranges_and_a_truncated_file_is_refused(tmp_path: Path) -> None:
    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    np.save(tmp_path / "x.npy", x)
    layout = plan_layout(WIDE, (tmp_path / "x.npy",), "npy", None, ())
    chunks = list(read_chunks(layout, WIDE, 3))
    assert [c.rows for c in chunks] == [3, 3, 1]
    assert np.array_equal(np.concatenate([c.inputs["x"] for c in chunks]), x)
    assert np.concatenate([c.ids for c in chunks]).tolist() == list(range(7))

    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[: -4 * 3 * 4 - 1])  # rows 0 and 1 whole, row 2 cut
    with pytest.raises(InvalidArgument, match=r"x\.npy: the file ends before row 2"):
        list(read_chunks(layout, WIDE, 3))
