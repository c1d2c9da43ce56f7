"""Reading ``inferd batch`` inputs in bounded chunks and turning them into input tensors.

Tabular files (CSV, Parquet, JSONL) are read as Arrow record batches, ``.npy`` files by row
ranges, each mapped into memory on its own (no copy; the pages leave the resident set with the
chunk), and image folders a slice of files at a time. Each chunk becomes a ``Chunk``: the tensors of its good
rows, their ids, and a ``Reject`` per row that could not be converted.

Columns map to a signature input by name: a column named like the input (one value, or a list of
values, per row), or the columns ``<input>_0 .. <input>_<k-1>``, or, for a model with one input
of shape ``[-1, k]``, every column but the id column when there are exactly ``k`` of them.
"""

from __future__ import annotations

import csv
import glob
import math
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from inferd.errors import InvalidArgument
from inferd.offline.columns import column_tensor, row_width
from inferd.offline.images import decode_images
from inferd.service import conform
from inferd.types import Signature, Tensors, TensorSpec, dtype_of

TABULAR = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
FORMATS = {**TABULAR, ".npy": "npy"}
IMAGES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ROW_COLUMN = "row"
FILE_COLUMN = "file"


@dataclass(frozen=True, slots=True)
class Reject:
    """A row that was not scored: its global row number, file, reason and (tabular) values."""

    row: int
    file: str
    error: str
    record: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """One unit of reading, scoring, writing and resuming.

    ``ids`` holds, per good row, the id column's value (or the row number); ``kept`` the
    ``--keep-columns`` values of the good rows.
    """

    index: int
    rows: int
    """Rows read, good and rejected."""
    source: str
    numbers: np.ndarray
    """Global row number of each good row."""
    ids: np.ndarray
    inputs: Tensors
    kept: Mapping[str, np.ndarray]
    rejects: Sequence[Reject]


@dataclass(frozen=True, slots=True)
class Layout:
    """How a job's inputs are read: files in order, their kind, and the column mapping."""

    files: tuple[Path, ...]
    kind: str
    """``csv``, ``parquet``, ``jsonl``, ``npy`` or ``images``."""
    id_column: str | None
    """The column that names rows; None numbers them (images: by file name)."""
    columns: Mapping[str, tuple[str, ...]]
    """Input name -> the columns that make it (one column holding the value or a list, or k)."""
    keep: tuple[str, ...] = ()

    @property
    def id_name(self) -> str:
        """The id column's name in the output."""
        return self.id_column or (FILE_COLUMN if self.kind == "images" else ROW_COLUMN)


def find_inputs(spec: str) -> tuple[tuple[Path, ...], str]:
    """The files a path, folder or glob names, and their kind.

    Raises:
        InvalidArgument: nothing matches, or the files mix formats.
    """
    path = Path(spec)
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        candidates = [path]
    else:
        candidates = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    data = [p for p in candidates if p.suffix.lower() in FORMATS]
    if data:
        kinds = {FORMATS[p.suffix.lower()] for p in data}
        if len(kinds) > 1:
            raise InvalidArgument(f"input {spec} mixes formats {sorted(kinds)}; give one format at a time")
        return tuple(data), kinds.pop()
    images = [p for p in candidates if p.suffix.lower() in IMAGES]
    if images:
        return tuple(images), "images"
    raise InvalidArgument(
        f"no input files at {spec}: expected {', '.join(sorted(FORMATS))} files or a folder of images"
    )


def file_columns(path: Path, kind: str) -> list[str]:
    """Column names of one tabular file, read from its header or schema; for JSONL, the keys of
    the objects among its first 64 KiB of lines (none for a file without one there: its lines
    are rows, rejected when they are not objects or lack a value)."""
    if kind == "parquet":
        return list(pq.ParquetFile(path).schema_arrow.names)
    with path.open("rb") as handle:
        lines = [handle.readline()] if kind == "csv" else handle.readlines(1 << 16)
    if kind == "csv":
        return next(csv.reader([lines[0].decode("utf-8-sig")]), [])
    keys: dict[str, None] = {}
    for line in lines:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            keys.update(dict.fromkeys(record))
    return list(keys)


def plan_layout(
    signature: Signature,
    files: tuple[Path, ...],
    kind: str,
    id_column: str | None,
    keep: Sequence[str],
    drop: Sequence[str] = (),
) -> Layout:
    """Map columns to the inputs of ``signature``, the request-side one (entity keys and request
    columns, not looked-up features) for a model with ``[features]``, checking every file's
    columns before any work. Columns in ``drop`` are not read.

    Raises:
        InvalidArgument: a column the mapping needs is missing in some file (named), a column
            to drop is not in the first file, or the model does not fit the input kind (``.npy``
            and images need one input).
    """
    if kind in ("npy", "images"):
        if len(signature.inputs) != 1:
            raise InvalidArgument(f"{kind} input feeds one tensor; the model takes {signature.input_names()}")
        if keep:
            raise InvalidArgument(f"--keep-columns needs tabular input, not {kind}")
        if id_column:
            raise InvalidArgument(f"--id-column needs tabular input, not {kind}")
        if kind == "npy":
            for path in files:
                _check_npy(signature.inputs[0], path)
        return Layout(files, kind, None, {signature.inputs[0].name: ()})
    listed = {path: file_columns(path, kind) for path in files}
    # A JSONL file with no object among its first lines (empty, or bad lines) is not checked.
    checked = {path: names for path, names in listed.items() if names or kind != "jsonl"}
    first_path, first = next(iter(checked.items()), (files[0], []))
    unknown = [c for c in drop if c not in first]
    if unknown:
        raise InvalidArgument(
            f"--drop_columns: {first_path} has no column(s) {unknown}; it has {_few(first)}"
        )
    first = [c for c in first if c not in drop]
    keep_all = list(keep) == ["*"]
    mapping = {spec.name: _columns_for(spec, first, signature, id_column) for spec in signature.inputs}
    kept = tuple(c for c in first if c != id_column) if keep_all else tuple(keep)
    needed = [c for cols in mapping.values() for c in cols] + list(kept) + ([id_column] if id_column else [])
    for path, names in checked.items():
        present = set(names)
        missing = [c for c in needed if c not in present]
        if missing:
            raise InvalidArgument(f"{path}: missing column(s) {missing}")
    return Layout(files, kind, id_column, mapping, kept)


def _check_npy(spec: TensorSpec, path: Path) -> None:
    """Refuse a ``.npy`` file whose rows cannot feed ``spec`` (rank, sizes, dtype kind), before
    any row is read: every row would fail the same way.

    Raises:
        InvalidArgument: names the file, the input, what it takes and what the file holds.
    """
    shape, dtype, _ = _npy_header(path)
    try:
        conform(spec, np.empty((0, *shape[1:]), dtype))
    except InvalidArgument:
        try:
            name = dtype_of(dtype).v2
        except KeyError:
            name = str(dtype)
        raise InvalidArgument(
            f"{path}: input {spec.name!r}: expected {spec.describe()}, got {name} {list(shape)}"
        ) from None


def _columns_for(
    spec: TensorSpec, names: list[str], signature: Signature, id_column: str | None
) -> tuple[str, ...]:
    if spec.name in names:
        return (spec.name,)
    width = row_width(spec)
    numbered = [f"{spec.name}_{i}" for i in range(width)] if width else []
    if numbered and all(c in names for c in numbered):
        return tuple(numbered)
    rest = [c for c in names if c != id_column]
    if len(signature.inputs) == 1 and width and len(rest) == width:
        return tuple(rest)
    wanted = f"a column {spec.name!r}" + (f", columns {numbered[0]}..{numbered[-1]}" if numbered else "")
    if len(signature.inputs) == 1 and width:
        wanted += f", or exactly {width} feature columns besides the id (found {len(rest)}: {_few(rest)})"
    raise InvalidArgument(f"input {spec.name!r} ({spec.describe()}): missing column(s); expected {wanted}")


def _few(names: Sequence[str]) -> str:
    """Column names for a message: all of up to eight, else the first three and the last two."""
    shown = list(names) if len(names) <= 8 else [*names[:3], "...", *names[-2:]]
    return ", ".join(shown)


def row_bytes(signature: Signature) -> int:
    """Bytes of one row of every input (free dimensions counted as 1, strings as 64 bytes)."""
    total = 0
    for spec in signature.inputs:
        dims = [d for d in (spec.shape or (1,))[1:] if d > 0] if spec.shape else []
        total += max(1, math.prod(dims)) * (spec.dtype.itemsize if spec.dtype.kind != "O" else 64)
    return total


def total_rows(layout: Layout) -> int | None:
    """Rows in the input when known without reading it (Parquet, ``.npy``, images), else None."""
    if layout.kind == "parquet":
        return sum(int(pq.ParquetFile(p).metadata.num_rows) for p in layout.files)
    if layout.kind == "npy":
        return sum(_npy_header(p)[0][0] for p in layout.files)
    if layout.kind == "images":
        return len(layout.files)
    return None


def read_chunks(layout: Layout, signature: Signature, chunk_rows: int) -> Iterator[Chunk]:
    """Every chunk of the input, in order; deterministic for a given ``chunk_rows``, which is what
    makes ``--resume`` line up with a previous run.

    Raises:
        InvalidArgument: a file that cannot be read (corrupt Parquet, bad ``.npy``, an I/O
            error), named with the reader's error.
    """
    index, row = 0, 0
    # An image folder is one input: its files are the rows.
    for path in layout.files[:1] if layout.kind == "images" else layout.files:
        blocks = _blocks(layout, path, chunk_rows)
        while True:
            try:
                block = next(blocks, None)
                if block is None:
                    break
                chunk = _chunk(layout, signature, path, block, index, row)
            except InvalidArgument:
                raise
            except Exception as exc:  # pyarrow's, numpy's and the OS's errors: name the file
                raise InvalidArgument(f"{path}: cannot be read: {type(exc).__name__}: {exc}") from exc
            yield chunk
            index, row = index + 1, row + chunk.rows


@dataclass(frozen=True, slots=True)
class _Block:
    """Raw rows of one chunk: Arrow columns, a ready tensor, or image files; plus early rejects
    as (offset in this block's row numbering, error)."""

    rows: int
    table: pa.Table | None = None
    tensor: np.ndarray | None = None
    images: tuple[Path, ...] = ()
    early: tuple[tuple[int, str], ...] = ()


def _blocks(layout: Layout, path: Path, chunk_rows: int) -> Iterator[_Block]:
    needed = sorted({c for cols in layout.columns.values() for c in cols} | set(layout.keep))
    if layout.id_column and layout.id_column not in needed:
        needed.append(layout.id_column)
    if layout.kind == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=needed):
            yield _Block(batch.num_rows, table=pa.Table.from_batches([batch]))
    elif layout.kind == "csv":
        inputs = sorted({c for cols in layout.columns.values() for c in cols})
        yield from _csv_blocks(path, needed, inputs, chunk_rows)
    elif layout.kind == "jsonl":
        yield from _jsonl_blocks(path, needed, chunk_rows)
    elif layout.kind == "npy":
        yield from _npy_blocks(path, chunk_rows)
    else:
        for start in range(0, len(layout.files), chunk_rows):
            files = layout.files[start : start + chunk_rows]
            yield _Block(len(files), images=files)


def _csv_blocks(path: Path, needed: list[str], text: list[str], chunk_rows: int) -> Iterator[_Block]:
    with path.open("rb") as handle:
        sample = handle.read(1 << 16)
    lines = max(1, sample.count(b"\n") - 1)
    block_bytes = max(1 << 14, int(len(sample) / lines * chunk_rows))
    bad: list[tuple[int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        # A data row's number is its physical line number minus the header's.
        bad.append(
            (
                row.number - 2 if row.number else -1,
                f"expected {row.expected_columns} fields, got {row.actual_columns}",
            )
        )
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=block_bytes, use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            include_columns=needed,
            column_types=dict.fromkeys(needed, pa.string()),
            strings_can_be_null=True,
        ),
    )
    seen = 0  # data rows before this block, good and bad
    for batch in reader:
        # The reader parses a block ahead, so the bad rows reported by now may lie past this
        # batch: it takes those among its rows.
        taken = 0
        while taken < len(bad) and bad[taken][0] < seen + batch.num_rows + taken:
            taken += 1
        early = tuple((n - seen, e) for n, e in bad[:taken])
        del bad[:taken]
        table = _typed(pa.Table.from_batches([batch]), [c for c in needed if c not in text])
        yield _Block(batch.num_rows + len(early), table=table, early=early)
        seen += batch.num_rows + len(early)
    if bad:  # after the last good row (or in a file without one)
        early = tuple((n - seen, e) for n, e in bad)
        yield _Block(len(early), table=reader.schema.empty_table(), early=early)


_LEADING_ZERO = r"^\s*[+-]?0[0-9]"
"""A number written with a leading zero: ``007``, ``-01.5``; not ``0``, ``0.5``."""


def _typed(table: pa.Table, names: list[str]) -> pa.Table:
    """``table`` with each of its text columns ``names`` as int64, else float64, else bool, when
    every value reads as one (as nulls when none is there). The id and kept columns of a CSV file
    are typed block by block so: Arrow's reader types them once, from the first block, and stops
    at a later value that does not fit (an id that is not a number, a note empty until then).
    A column with a number written with a leading zero (``007``, ``02134``) stays text: it is a
    code, whose zeros a number would drop."""
    for name in names:
        text = table.column(name)
        if text.null_count == len(text):  # typed by the other blocks when the parts are merged
            table = table.set_column(table.schema.get_field_index(name), name, pa.nulls(len(text)))
            continue
        if pc.any(pc.match_substring_regex(text, _LEADING_ZERO)).as_py():
            continue
        for kind in (pa.int64(), pa.float64(), pa.bool_()):
            try:
                column = pc.cast(text, kind)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            table = table.set_column(table.schema.get_field_index(name), name, column)
            break
    return table


def _jsonl_blocks(path: Path, needed: list[str], chunk_rows: int) -> Iterator[_Block]:
    with path.open("rb") as handle:
        while True:
            lines = [line for _, line in zip(range(chunk_rows), handle, strict=False)]
            if not lines:
                return
            columns: dict[str, list[Any]] = {c: [] for c in needed}
            early: list[tuple[int, str]] = []
            for offset, line in enumerate(lines):
                try:
                    record = orjson.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"a JSON object, got {type(record).__name__}")
                except (orjson.JSONDecodeError, ValueError) as exc:
                    early.append((offset, f"not a JSON object: {exc}"))
                    continue
                for name in needed:
                    columns[name].append(record.get(name))
            yield _Block(
                len(lines), table=pa.table({c: _arrow(v) for c, v in columns.items()}), early=tuple(early)
            )


def _arrow(values: list[Any]) -> pa.Array:
    """Values of one JSON column as Arrow; mixed types fall back to their text, parsed later."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(
            [v if v is None or isinstance(v, str) else orjson.dumps(v).decode() for v in values], pa.string()
        )


def read_npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype of the ``.npy`` file open in ``handle``, left at its data."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    return tuple(shape), bool(fortran), np.dtype(dtype)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """Shape, dtype and data offset of a C-order ``.npy`` file."""
    with path.open("rb") as handle:
        shape, fortran, dtype = read_npy_header(handle)
        if fortran or not shape:
            raise InvalidArgument(f"{path}: expected a C-order array with a batch axis, got shape {shape}")
        return tuple(shape), np.dtype(dtype), handle.tell()


def _npy_blocks(path: Path, chunk_rows: int) -> Iterator[_Block]:
    shape, dtype, offset = _npy_header(path)
    row_size = math.prod(shape[1:]) * dtype.itemsize
    size = path.stat().st_size
    if size < offset + shape[0] * row_size:
        raise InvalidArgument(f"{path}: the file ends before row {(size - offset) // max(row_size, 1)}")
    with path.open("rb") as handle:
        for start in range(0, shape[0], chunk_rows):
            rows = min(chunk_rows, shape[0] - start)
            yield _Block(rows, tensor=_mapped(handle, offset + start * row_size, rows, shape[1:], dtype))


def _mapped(handle: BinaryIO, at: int, rows: int, inner: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Rows of a file as a read-only array over its own memory map, read in up front
    (``MAP_POPULATE``): no copy, and the pages leave the resident set when the array goes."""
    nbytes = rows * math.prod(inner) * dtype.itemsize
    if not nbytes:
        return np.empty((rows, *inner), dtype)
    start = at - at % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(
        handle.fileno(),
        at - start + nbytes,
        flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
        prot=mmap.PROT_READ,
        offset=start,
    )
    return np.frombuffer(mapped, dtype=dtype, count=nbytes // dtype.itemsize, offset=at - start).reshape(
        rows, *inner
    )


def _chunk(
    layout: Layout, signature: Signature, path: Path, block: _Block, index: int, first_row: int
) -> Chunk:
    errors: dict[int, str] = dict(block.early)
    good = np.arange(block.rows, dtype=np.int64)
    if errors:
        good = np.setdiff1d(good, np.fromiter(errors, dtype=np.int64))
    inputs: Tensors = {}
    if block.tensor is not None:
        inputs[signature.inputs[0].name] = block.tensor
    elif block.images:
        inputs[signature.inputs[0].name], image_errors = decode_images(signature.inputs[0], block.images)
        errors.update(image_errors)
    else:
        assert block.table is not None
        for spec in signature.inputs:
            value, bad = column_tensor(spec, block.table, layout.columns[spec.name])
            for row, message in bad.items():
                errors.setdefault(int(good[row]), message)
            inputs[spec.name] = value
    table_rows = np.ones(len(good), dtype=bool)  # good rows of the table that stay good
    if errors:
        table_rows = np.isin(good, list(errors), invert=True)
        inputs = {name: value[table_rows] for name, value in inputs.items()}
    kept_rows = good[table_rows]
    ids = _ids(layout, block, first_row, kept_rows, table_rows)
    kept = {c: _numpy(block.table.column(c))[table_rows] for c in layout.keep} if block.table else {}
    rejects = [
        _reject(layout, block, path, first_row, good, row, error) for row, error in sorted(errors.items())
    ]
    return Chunk(index, block.rows, str(path), kept_rows + first_row, ids, inputs, kept, rejects)


def _ids(
    layout: Layout, block: _Block, first_row: int, rows: np.ndarray, table_rows: np.ndarray
) -> np.ndarray:
    if block.images:
        return np.array([block.images[i].name for i in rows], dtype=object)
    if layout.id_column is None:
        return np.asarray(rows + first_row)
    assert block.table is not None
    return np.asarray(_numpy(block.table.column(layout.id_column))[table_rows])


def _reject(
    layout: Layout, block: _Block, path: Path, first_row: int, good: np.ndarray, row: int, error: str
) -> Reject:
    record = None
    table_row = np.searchsorted(good, row)
    if block.table is not None and table_row < len(good) and good[table_row] == row:
        record = {name: block.table.column(name)[int(table_row)].as_py() for name in block.table.column_names}
    where = str(block.images[row]) if block.images else str(path)
    return Reject(first_row + row, where, error, record)


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """The column as numpy; an integer column with nulls as objects (ints and None): numpy would
    make floats of it, NaN for its nulls, and the output would hold those."""
    if column.null_count and pa.types.is_integer(column.type):
        return np.array(column.to_pylist(), dtype=object)
    return np.asarray(column.to_numpy())
