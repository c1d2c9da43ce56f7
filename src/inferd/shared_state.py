"""A state the workers of one ``--workers N`` server share through their private folder: one
worker changes it under a lock and publishes it whole, every worker follows it and says which
publication it has applied, and the one that published can wait until all have.

Files in ``folder``, for a state named ``name``: ``name`` (the pickled state, replaced whole by a
rename), ``name.lock`` (held by the worker changing it, so that changes through different workers
apply one after another) and ``name.applied-<worker>`` (``pid generation``: what each worker has
applied). Methods block briefly on the file system (small files).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

SYNC_TIMEOUT_S = 120.0
"""How long a change waits for the other workers to apply it before it answers anyway."""


class SharedState(Generic[T]):
    """The state ``name`` shared by the workers in ``folder``; ``worker`` names this worker's
    ``applied`` file."""

    def __init__(self, folder: Path, name: str, worker: int) -> None:
        self._folder = folder
        self._name = name
        self._path = folder / name
        self._lock_path = folder / f"{name}.lock"
        self._applied = folder / f"{name}.applied-{worker}"
        self._seen: tuple[int, int] | None = None  # (inode, mtime_ns) of the last state read

    @property
    def folder(self) -> Path:
        """The workers' private folder, where the state's files are."""
        return self._folder

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[T | None]:
        """Hold the lock across workers; yields the state published last (None: none yet)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:  # polled, not blocking a thread: a cancelled call leaves nothing waiting
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            yield self.read()
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> T | None:
        """The state published last (None: none yet)."""
        try:
            with self._path.open("rb") as file:
                stat = os.fstat(file.fileno())
                state: T = pickle.load(file)
        except FileNotFoundError:
            return None
        self._seen = (stat.st_ino, stat.st_mtime_ns)
        return state

    def changed(self) -> T | None:
        """The state published last if it was published since the last ``read``, else None."""
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return None
        if (stat.st_ino, stat.st_mtime_ns) == self._seen:
            return None
        return self.read()

    def publish(self, state: T) -> None:
        """Replace the published state with ``state`` (call holding ``locked``)."""
        _replace(self._path, pickle.dumps(state))

    def acknowledge(self, generation: int) -> None:
        """Record that this worker has applied publication ``generation``."""
        _replace(self._applied, f"{os.getpid()} {generation}".encode())

    async def wait_applied(self, generation: int, timeout_s: float = SYNC_TIMEOUT_S) -> None:
        """Wait until every live worker has applied ``generation`` (a worker that died is skipped:
        its successor applies the state when it starts), at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (behind := self._behind(generation)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if behind:
            log.warning(
                "%s %d: workers %s had not applied it after %.0f s", self._name, generation, behind, timeout_s
            )

    def _behind(self, generation: int) -> list[str]:
        behind = []
        for path in self._folder.glob(f"{self._name}.applied-*"):
            try:
                pid, applied = map(int, path.read_text().split())
            except (OSError, ValueError):
                continue
            if applied < generation and _alive(pid):
                behind.append(path.name.rpartition("-")[2])
        return behind


def _replace(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
