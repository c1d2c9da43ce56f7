"""The embedded store: a Parquet or CSV table held in memory, reloaded when the file changes.

No server at all: the demo needs nothing installed. The file is read in a thread, first on the
first lookup; afterwards it is checked at most every ``poll_interval_s`` and re-read when its
modification time or size changed. A re-read that fails (say, a half-written file) is logged and
the previous contents keep answering.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from inferd.errors import ConfigError
from inferd.features.store import StoreError, Value
from inferd.features.tables import entity_keys, read_chunks

log = logging.getLogger(__name__)


class _Table:
    __slots__ = ("columns", "rows")

    def __init__(self, columns: dict[str, int], rows: dict[str, tuple[Any, ...]]) -> None:
        self.columns = columns
        self.rows = rows


def _read(path: Path, entity: tuple[str, ...]) -> _Table:
    columns: dict[str, int] = {}
    rows: dict[str, tuple[Any, ...]] = {}
    for chunk in read_chunks(path):
        names = [name for name in chunk if name not in entity]
        columns = {name: i for i, name in enumerate(names)}
        keys = entity_keys(chunk, entity, path)
        rows.update(zip(keys, zip(*(chunk[name] for name in names), strict=True), strict=True))
    return _Table(columns, rows)


class EmbeddedStore:
    """Features of ``path``'s rows keyed by the ``entity`` columns. Event loop thread only."""

    def __init__(self, path: Path, entity: tuple[str, ...], poll_interval_s: float = 1.0) -> None:
        self._path = path
        self._entity = entity
        self._poll_interval_s = poll_interval_s
        self._table: _Table | None = None
        self._stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        self._loading: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def trace_attributes(self) -> Mapping[str, str | int]:
        return {}  # in this process: no database client span attributes

    async def get(self, entities: Sequence[str], names: Sequence[str]) -> list[list[Value] | None]:
        now = time.monotonic()
        if now >= self._next_check and self._loading is None:
            self._next_check = now + self._poll_interval_s
            self._reload_if_changed()
        if self._table is None and self._loading is not None:
            await asyncio.shield(self._loading)
        table = self._table
        if table is None:
            raise StoreError("loading", f"{self._path} could not be read; see the server log")
        indexes = [table.columns.get(name) for name in names]
        answer: list[list[Value] | None] = []
        for entity in entities:
            row = table.rows.get(entity)
            answer.append(None if row is None else [None if i is None else row[i] for i in indexes])
        return answer

    def _reload_if_changed(self) -> None:
        try:
            info = os.stat(self._path)
        except OSError as exc:
            log.warning("feature table %s: %s", self._path, exc.strerror)
            return
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            self._loading = asyncio.get_running_loop().create_task(self._load(stamp))

    async def _load(self, stamp: tuple[int, int]) -> None:
        try:
            self._table = await asyncio.to_thread(_read, self._path, self._entity)
            self._stamp = stamp
            log.info("feature table %s: %d entities", self._path, len(self._table.rows))
        except (OSError, ValueError, ConfigError) as exc:
            log.warning("feature table %s not (re)loaded: %s", self._path, exc)
        finally:
            self._loading = None

    async def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
