"""Feature tables on disk: Parquet (read with pyarrow, imported on first use) and CSV (the standard
library).

Tables are read in column chunks so that a large table is never whole in memory twice. Empty CSV
cells and Parquet nulls read as None (a missing feature).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from inferd.errors import ConfigError

Chunk = dict[str, list[Any]]
"""Column name -> values of some consecutive rows."""


def count_rows(path: Path) -> int:
    """Rows in the table at ``path`` (Parquet: from its footer; CSV: by counting records)."""
    if path.suffix == ".parquet":
        return int(_parquet().ParquetFile(path).metadata.num_rows)
    with path.open(newline="") as file:
        return max(sum(1 for _ in csv.reader(file)) - 1, 0)


def read_chunks(path: Path, chunk_rows: int = 10_000) -> Iterator[Chunk]:
    """The table at ``path`` in chunks of at most ``chunk_rows`` rows.

    Raises:
        ConfigError: the file is neither .parquet nor .csv.
        OSError, ValueError: it cannot be read or parsed.
    """
    if path.suffix == ".parquet":
        for batch in _parquet().ParquetFile(path).iter_batches(batch_size=chunk_rows):
            yield batch.to_pydict()
    elif path.suffix == ".csv":
        yield from _csv_chunks(path, chunk_rows)
    else:
        raise ConfigError(f"{path}: expected a .parquet or .csv table")


def _csv_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    with path.open(newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: no header row")
        columns: list[list[Any]] = [[] for _ in header]
        for number, record in enumerate(reader, start=2):
            if len(record) != len(header):
                raise ValueError(f"{path}:{number}: {len(record)} fields, the header has {len(header)}")
            for column, value in zip(columns, record, strict=True):
                column.append(value or None)
            if len(columns[0]) >= chunk_rows:
                yield dict(zip(header, columns, strict=True))
                columns = [[] for _ in header]
        if columns[0]:
            yield dict(zip(header, columns, strict=True))


def entity_keys(chunk: Chunk, entity: tuple[str, ...], where: Path) -> list[str]:
    """Each row's entity key: the ``entity`` columns' values joined with ``:``.

    Raises:
        ValueError: an entity column is missing or a row has no value in it.
    """
    if missing := [name for name in entity if name not in chunk]:
        raise ValueError(f"{where}: no entity column(s) {missing}; columns are {sorted(chunk)}")
    parts = [chunk[name] for name in entity]
    if any(value is None for column in parts for value in column):
        raise ValueError(f"{where}: a row has no value in entity column(s) {list(entity)}")
    return [":".join(str(v) for v in values) for values in zip(*parts, strict=True)]


def _parquet() -> Any:
    import pyarrow.parquet as pq

    return pq
