"""Writing ``inferd batch`` results: one part file per chunk, merged into the output at the end.

While a job runs, its results live in ``<OUTPUT>.partial/``: ``job.json`` (what the job is, so
that ``--resume`` can check it continues the same job), and per finished chunk a rejects file and
then a part file, each written under a temporary name and renamed into place. A part file's
presence is the record that its chunk is done, so a killed run loses at most the chunks it was
working on, and a resumed one neither redoes nor duplicates a chunk. When every chunk is done the
parts are concatenated into OUTPUT (and the rejects into the rejects file) and the folder goes.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from inferd.errors import InvalidArgument
from inferd.offline.sources import Chunk, read_npy_header
from inferd.types import Tensors

OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".npy": "npy"}
_JOB = "job.json"


def output_format(path: Path) -> str:
    """The output format its extension names.

    Raises:
        InvalidArgument: an extension with no writer.
    """
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidArgument(f"output {path}: expected one of {', '.join(sorted(OUTPUT_FORMATS))}")
    return fmt


class PartStore:
    """The parts folder of one job. ``write`` may run in a thread other than the constructor's,
    one call at a time."""

    def __init__(self, output: Path, job: Mapping[str, Any], resume: bool) -> None:
        """Open the parts folder, checking a folder left by an earlier run.

        ``job`` describes the job; on resume the stored description is kept (``self.job``) so that
        chunk sizes match the first run's.

        Without ``resume``, a parts folder holding no finished chunk (a run that failed or was
        stopped before its first part) is removed and the job starts over.

        Raises:
            InvalidArgument: a parts folder with finished chunks exists without ``resume``, or
                belongs to another job.
        """
        self.output = output
        self.format = output_format(output)
        self.folder = output.with_name(output.name + ".partial")
        stored = self.folder / _JOB
        if self.folder.exists() and not resume:
            if self.done():
                raise InvalidArgument(
                    f"{self.folder} holds {len(self.done())} finished chunk(s) of an interrupted run: "
                    "pass --resume to continue it, or delete the folder to start over"
                )
            shutil.rmtree(self.folder)
        self.job = dict(job)
        if resume and stored.exists():
            previous = orjson.loads(stored.read_bytes())
            changed = sorted(
                k for k in job if k not in ("chunk_rows", "batch_size") and previous.get(k) != job[k]
            )
            if changed:
                raise InvalidArgument(f"--resume: {self.folder} is from another job (differs in {changed})")
            self.job = previous
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(stored, orjson.dumps(self.job))

    def done(self) -> set[int]:
        """Indexes of the chunks whose part is written."""
        return {int(p.stem.split("-")[1]) for p in self.folder.glob("part-*") if not p.name.endswith(".tmp")}

    def abandon(self) -> str:
        """After a failed run: remove the parts folder when it holds no finished chunk (so the
        next run starts clean), else keep it for ``--resume``. Returns what was done, for the
        error message."""
        output_tmp = self.output.with_name(self.output.name + ".tmp")
        output_tmp.unlink(missing_ok=True)
        finished = len(self.done()) if self.folder.exists() else 0
        if not finished:
            shutil.rmtree(self.folder, ignore_errors=True)
            return "nothing was written"
        for stale in self.folder.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        return f"{finished} finished chunk(s) are kept in {self.folder}: run again with --resume to continue"

    def write(self, chunk: Chunk, outputs: Tensors, id_name: str) -> None:
        """Write one chunk's rejects, then its part (the part last: it marks the chunk done)."""
        name = f"{chunk.index:08d}"
        if chunk.rejects:
            lines = [
                orjson.dumps(
                    {"row": r.row, "file": r.file, "error": r.error, "record": r.record},
                    default=str,
                    option=orjson.OPT_SERIALIZE_NUMPY,
                )
                for r in chunk.rejects
            ]
            _atomic_write(self.folder / f"rejects-{name}.jsonl", b"\n".join(lines) + b"\n")
        part = self.folder / f"part-{name}.{self.format}"
        tmp = part.with_name(part.name + ".tmp")
        if self.format == "npy":
            with tmp.open("wb") as handle:
                np.save(handle, next(iter(outputs.values())))
        else:
            table = _table(chunk, outputs, id_name, flat=self.format == "csv")
            if self.format == "parquet":
                pq.write_table(table, tmp)
            elif self.format == "csv":
                pacsv.write_csv(table, tmp)
            else:
                tmp.write_bytes(b"".join(orjson.dumps(row, default=str) + b"\n" for row in table.to_pylist()))
        os.replace(tmp, part)

    def finish(self, rejects: Path) -> int:
        """Merge the parts into the output and the rejects into ``rejects`` (removed when there are
        none); remove the folder.

        Returns:
            The number of rejected rows.
        """
        parts = sorted(p for p in self.folder.glob("part-*") if not p.name.endswith(".tmp"))
        tmp = self.output.with_name(self.output.name + ".tmp")
        if self.format == "parquet":
            _merge_parquet(parts, tmp)
        elif self.format == "npy":
            _merge_npy(parts, tmp)
        else:
            if self.format == "csv":  # a part of a chunk whose rows were all rejected is a header
                parts = [p for p in parts if _has_csv_rows(p)] or parts[:1]
            with tmp.open("wb") as out:
                for i, part in enumerate(parts):
                    with part.open("rb") as source:
                        if self.format == "csv" and i:
                            source.readline()  # each part has its header; keep the first
                        shutil.copyfileobj(source, out, 1 << 20)
        os.replace(tmp, self.output)
        count = 0
        reject_parts = sorted(self.folder.glob("rejects-*.jsonl"))
        if reject_parts:
            with rejects.open("wb") as out:
                for part in reject_parts:
                    data = part.read_bytes()
                    count += data.count(b"\n")
                    out.write(data)
        else:  # a rejects file left by an earlier run would report rows this one scored
            rejects.unlink(missing_ok=True)
        shutil.rmtree(self.folder)
        return count


def _has_csv_rows(part: Path) -> bool:
    with part.open("rb") as handle:
        handle.readline()
        return bool(handle.read(1))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _table(chunk: Chunk, outputs: Tensors, id_name: str, flat: bool) -> pa.Table:
    """Id, kept columns, then each output: a column per value when ``flat`` (CSV), else a list
    column for outputs wider than one value per row.

    Raises:
        InvalidArgument: an output column has the name of the id or a kept column.
    """
    columns: dict[str, pa.Array] = {id_name: pa.array(chunk.ids)}
    for name, value in chunk.kept.items():
        columns.setdefault(name, pa.array(value))
    produced: dict[str, pa.Array] = {}
    for name, value in outputs.items():
        width = math.prod(value.shape[1:])
        rows = value.reshape(len(value), width) if value.ndim > 1 else value
        if value.ndim == 1 or (width == 1 and not flat):
            produced[name] = pa.array(rows.reshape(-1))
        elif flat:
            for i in range(width):
                produced[f"{name}_{i}"] = pa.array(rows[:, i])
        else:
            produced[name] = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), width)
    if clash := [name for name in produced if name in columns]:
        raise InvalidArgument(
            f"output column(s) {clash} would replace the id or kept column(s) of that name: "
            "keep other columns (--keep-columns), or choose other outputs (--outputs)"
        )
    return pa.table(columns | produced)


def _merge_parquet(parts: list[Path], target: Path) -> None:
    """Concatenate the parts with rows (a chunk whose every row was rejected has an empty part,
    whose list columns may be typed differently) into one schema that holds them all (see
    ``_common_schema``)."""
    filled = [p for p in parts if pq.ParquetFile(p).metadata.num_rows] or parts[:1]
    if not filled:
        pq.write_table(pa.table({}), target)
        return
    schema = _common_schema([pq.read_schema(p) for p in filled])
    with pq.ParquetWriter(target, schema) as writer:
        for part in filled:
            writer.write_table(pq.read_table(part).cast(schema))


def _common_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """The parts' columns, each typed to hold every part's values: the same type, else the one
    Arrow promotes them to (null to any type, int to float), else text. The id and kept columns
    are typed by each chunk's values: all null in one chunk, or numbers in one file and text in
    another."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    fields = []
    for i, field in enumerate(schemas[0]):
        try:
            common = pa.unify_schemas(
                [pa.schema([s.field(i)]) for s in schemas], promote_options="permissive"
            )
            fields.append(common.field(0))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            fields.append(pa.field(field.name, pa.string()))
    return pa.schema(fields)


def _merge_npy(parts: list[Path], target: Path) -> None:
    headers = []
    for part in parts:
        with part.open("rb") as handle:
            shape, _, dtype = read_npy_header(handle)
            headers.append((part, shape, dtype, handle.tell()))
    # Empty parts (chunks whose every row was rejected) add nothing, and may be shaped apart.
    headers = [h for h in headers if h[1][0]] or headers[:1]
    inner = headers[0][1][1:] if headers else (0,)
    dtype = headers[0][2] if headers else np.dtype(np.float32)
    rows = sum(shape[0] for _, shape, _, _ in headers)
    with target.open("wb") as out:
        np.lib.format.write_array_header_2_0(
            out,
            {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, *inner)},
        )
        for part, _, _, offset in headers:
            with part.open("rb") as source:
                source.seek(offset)
                shutil.copyfileobj(source, out, 1 << 20)
