"""A bounded local cache of model versions downloaded from object stores.

Each cached version is a folder ``<cache>/<key>/`` holding ``files/`` (the version's content)
and ``manifest.json`` (its URI, the listing fingerprint it was verified against, and its size in
bytes). The manifest is written last and the folder is moved into place in one rename, so a
folder with a manifest is complete; anything else (a crash mid-download) is removed at start.
Because the manifests live beside the files, a restarted server finds its versions again
without downloading them.

The cache holds at most ``max_bytes`` of files. Before a version is added, the least recently
used versions that are not protected (the versions being served) are removed until it fits;
when it cannot fit, the version is refused. Last use is the manifest's modification time, so
the order survives restarts.

Processes may share a folder (the workers of ``--workers`` do): adding a version, with its
eviction, and the clean-up at start hold the folder's lock (``LOCK``), and a version that another
process added meanwhile is taken as it is. Each process protects only the versions it serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"


class CacheFull(OSError):
    """A version is larger than the space the cache may give it."""


@dataclass(frozen=True, slots=True)
class CachedVersion:
    """One complete entry: where its files are, what it was verified against, its size."""

    uri: str
    fingerprint: str
    size_bytes: int
    folder: Path  # the entry's folder; the version's files are in ``folder / "files"``

    @property
    def files(self) -> Path:
        return self.folder / "files"


DERIVED = "derived"
"""The cache folder's subfolder of files inferd derives from versions (``derived_dir``): not
entries of this cache, and never removed by it."""


def derived_dir(cache_dir: str) -> Path:
    """Where files derived from versions are kept: ``DERIVED`` under ``cache_dir`` (the
    ``--model_cache_dir`` flag), or under ``default_cache_dir()`` when it is empty."""
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / DERIVED


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock file (blocking) against other processes; released on exit, also
    when the process dies."""
    with open(folder / LOCK, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/inferd/models``, or ``~/.cache/inferd/models``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "inferd" / "models"


class ModelCache:
    """Versions by URI, at most ``max_bytes`` of them (0: no bound)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._protected: set[str] = set()
        folder.mkdir(parents=True, exist_ok=True)
        with locked(self.folder):  # another process's download in progress is not interrupted
            for entry in folder.iterdir():
                if entry.name == DERIVED or not entry.is_dir():
                    continue
                if entry.name.startswith(".tmp-") or not (entry / MANIFEST).is_file():
                    shutil.rmtree(entry, ignore_errors=True)  # an interrupted download

    def entry_folder(self, uri: str) -> Path:
        """The folder that holds (or would hold) the entry of ``uri``."""
        return self.folder / hashlib.blake2b(uri.encode(), digest_size=12).hexdigest()

    def entries(self) -> list[CachedVersion]:
        """Every complete entry, least recently used first."""
        found = []
        for entry in self.folder.iterdir():
            manifest = entry / MANIFEST
            try:
                raw = json.loads(manifest.read_text())
                found.append(
                    (
                        manifest.stat().st_mtime_ns,
                        CachedVersion(
                            str(raw["uri"]), str(raw["fingerprint"]), int(raw["size_bytes"]), entry
                        ),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return [cached for _, cached in sorted(found, key=lambda item: item[0])]

    def lookup(self, uri: str, fingerprint: str, use: bool = True) -> Path | None:
        """The local files of ``uri`` if they were verified against ``fingerprint``, marking the
        entry used with ``use``; else None."""
        folder = self.entry_folder(uri)
        try:
            raw = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if raw.get("uri") != uri or raw.get("fingerprint") != fingerprint:
            return None
        if use:
            os.utime(folder / MANIFEST)
        return folder / "files"

    def protect(self, uris: Collection[str]) -> None:
        """Never evict these versions (the ones being served) until the next call."""
        self._protected = set(uris)

    def used_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())

    def add(self, uri: str, fingerprint: str, size_bytes: int, fill: Callable[[Path], None]) -> Path:
        """Make room, call ``fill(folder)`` to write the version's files into an empty folder,
        then record it; return the local folder of its files.

        When another process sharing the folder added the same version meanwhile, its folder is
        returned and ``fill`` is not called.

        Raises:
            CacheFull: even with every unprotected version evicted, ``size_bytes`` does not fit.
            Exception: whatever ``fill`` raises; nothing is recorded then.
        """
        with locked(self.folder):
            return self.lookup(uri, fingerprint) or self._add(uri, fingerprint, size_bytes, fill)

    def _add(self, uri: str, fingerprint: str, size_bytes: int, fill: Callable[[Path], None]) -> Path:
        self._make_room(uri, size_bytes)
        scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.folder))
        try:
            (scratch / "files").mkdir()
            fill(scratch / "files")
            manifest = {"uri": uri, "fingerprint": fingerprint, "size_bytes": size_bytes}
            (scratch / MANIFEST).write_text(json.dumps(manifest))
            final = self.entry_folder(uri)
            if final.exists():
                shutil.rmtree(final)
            scratch.rename(final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return final / "files"

    def _make_room(self, uri: str, size_bytes: int) -> None:
        if self.max_bytes <= 0:
            return
        entries = [e for e in self.entries() if e.uri != uri]  # a stale copy of uri is replaced
        used = sum(e.size_bytes for e in entries)
        evictable = [e for e in entries if e.uri not in self._protected]
        if size_bytes > self.max_bytes - (used - sum(e.size_bytes for e in evictable)):
            raise CacheFull(
                f"{uri}: {size_bytes} bytes do not fit in the model cache {self.folder} "
                f"(--model_cache_bytes {self.max_bytes}, {used - sum(e.size_bytes for e in evictable)} "
                "held by versions being served)"
            )
        for entry in evictable:
            if used + size_bytes <= self.max_bytes:
                break
            log.info("model cache: evicting %s (%d bytes, least recently used)", entry.uri, entry.size_bytes)
            shutil.rmtree(entry.folder, ignore_errors=True)
            used -= entry.size_bytes
