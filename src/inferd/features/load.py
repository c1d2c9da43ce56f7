"""``inferd features load``: materialise a Parquet or CSV table into Redis, one hash per row.

Rows go in pipelined chunks (one round trip each). Re-running updates in place: present values
are set with ``HSET``, empty ones removed with ``HDEL``, so a reader never sees an entity vanish
midway; fields whose column left the table stay until the key expires or is deleted.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from inferd.features.tables import count_rows, entity_keys, read_chunks


def load_table(
    path: Path,
    url: str,
    entity: tuple[str, ...],
    prefix: str = "",
    ttl_s: int = 0,
    chunk_rows: int = 1000,
    progress: TextIO | None = sys.stderr,
) -> tuple[int, float]:
    """Write each row of ``path`` to the hash ``<prefix>:<entity>`` (prefix default: the entity
    column names joined with ``:``), expiring after ``ttl_s`` seconds when it is positive.

    Returns:
        Rows written and the seconds it took.

    Raises:
        OSError, ValueError: the table cannot be read; redis.RedisError: Redis failed.
    """
    import redis

    client = redis.Redis.from_url(url)
    key_prefix = f"{prefix or ':'.join(entity)}:"
    total = count_rows(path)
    bar = _Progress(path.name, total, progress)
    written = 0
    try:
        for chunk in read_chunks(path, chunk_rows):
            keys = entity_keys(chunk, entity, path)
            features = [name for name in chunk if name not in entity]
            pipe = client.pipeline(transaction=False)
            for i, key in enumerate(keys):
                values = {name: chunk[name][i] for name in features}
                present = {name: _text(value) for name, value in values.items() if value is not None}
                absent = [name for name, value in values.items() if value is None]
                if present:
                    pipe.hset(key_prefix + key, mapping=present)  # type: ignore[arg-type]
                if absent:
                    pipe.hdel(key_prefix + key, *absent)
                if ttl_s > 0:
                    pipe.expire(key_prefix + key, ttl_s)
            pipe.execute()
            written += len(keys)
            bar.update(written)
    finally:
        client.close()
    return written, bar.done(written)


def _text(value: object) -> str:
    """A value as the hash keeps it: booleans as 1 and 0, which lookups read as numbers (as the
    embedded store reads a Parquet boolean), not as True and False, which they cannot read."""
    return str(int(value)) if isinstance(value, bool) else str(value)


class _Progress:
    """A one-line progress bar with the rate so far, redrawn at most ten times a second."""

    WIDTH = 30

    def __init__(self, label: str, total: int, out: TextIO | None) -> None:
        self._label = label
        self._total = max(total, 1)
        self._out = out
        self._started = time.perf_counter()
        self._drawn = 0.0

    def update(self, rows: int) -> None:
        now = time.perf_counter()
        if self._out is None or (now - self._drawn < 0.1 and rows < self._total):
            return
        self._drawn = now
        filled = self.WIDTH * min(rows, self._total) // self._total
        rate = rows / max(now - self._started, 1e-9)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._out.write(f"\r{self._label} [{bar}] {rows:,}/{self._total:,} rows  {rate:,.0f} rows/s")
        self._out.flush()

    def done(self, rows: int) -> float:
        elapsed = time.perf_counter() - self._started
        if self._out is not None:
            self._out.write("\n")
        return elapsed
