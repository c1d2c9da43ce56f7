"""The model cache: its size bound, least-recently-used eviction of versions not served, and
its reuse by a new process (a restarted server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inferd.model_cache import LOCK, CacheFull, ModelCache


def fill_with(size: int):  # type: ignore[no-untyped-def]
    def fill(folder: Path) -> None:
        (folder / "model.bin").write_bytes(b"x" * size)

    return fill


def touch_order(cache: ModelCache, uris: list[str]) -> None:
    """Make ``uris`` used in this order (oldest first), whatever the clock's resolution."""
    for age, uri in enumerate(reversed(uris)):
        manifest = cache.entry_folder(uri) / "manifest.json"
        os.utime(manifest, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))


def test_the_least_recently_used_versions_not_served_are_evicted_to_make_room(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, max_bytes=300)
    for uri in ("s3://b/m/1", "s3://b/m/2", "s3://b/m/3"):
        cache.add(uri, "fp", 100, fill_with(100))
    touch_order(cache, ["s3://b/m/1", "s3://b/m/2", "s3://b/m/3"])
    cache.protect({"s3://b/m/1"})  # served: never evicted, though least recently used
    cache.add("s3://b/m/4", "fp", 150, fill_with(150))
    assert sorted(e.uri for e in cache.entries()) == ["s3://b/m/1", "s3://b/m/4"]
    assert cache.used_bytes() <= 300
    assert cache.lookup("s3://b/m/2", "fp") is None


def test_a_version_that_cannot_fit_beside_the_served_ones_is_refused(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, max_bytes=300)
    cache.add("s3://b/m/1", "fp", 200, fill_with(200))
    cache.protect({"s3://b/m/1"})
    with pytest.raises(CacheFull, match="--model_cache_bytes 300"):
        cache.add("s3://b/m/2", "fp", 150, fill_with(150))
    assert [e.uri for e in cache.entries()] == ["s3://b/m/1"]


def test_lookup_needs_the_same_fingerprint_and_marks_the_entry_used(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, max_bytes=0)
    local = cache.add("s3://b/m/1", "fp-a", 10, fill_with(10))
    assert (local / "model.bin").read_bytes() == b"x" * 10
    assert cache.lookup("s3://b/m/1", "fp-b") is None
    cache.add("s3://b/m/2", "fp", 10, fill_with(10))
    touch_order(cache, ["s3://b/m/1", "s3://b/m/2"])
    assert cache.lookup("s3://b/m/1", "fp-a") == local
    assert [e.uri for e in cache.entries()] == ["s3://b/m/2", "s3://b/m/1"]


def test_a_failed_fill_records_nothing_and_a_new_process_reuses_complete_entries(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, max_bytes=1000)
    cache.add("s3://b/m/1", "fp", 10, fill_with(10))

    def broken(folder: Path) -> None:
        (folder / "half").write_bytes(b"x")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        cache.add("s3://b/m/2", "fp", 10, broken)
    (tmp_path / ".tmp-crashed").mkdir()  # a download a killed process left behind
    (tmp_path / "no-manifest").mkdir()
    again = ModelCache(tmp_path, max_bytes=1000)
    assert [e.uri for e in again.entries()] == ["s3://b/m/1"]
    assert again.lookup("s3://b/m/1", "fp") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK, again.entry_folder("s3://b/m/1").name])


def test_checking_that_a_listed_version_is_cached_does_not_count_as_a_use(tmp_path: Path) -> None:
    """A restarted server checks every listed version against the cache: those checks used to
    mark them all used, in listing order, so the eviction order forgot which ones had served."""
    cache = ModelCache(tmp_path, max_bytes=0)
    for uri in ("s3://b/m/1", "s3://b/m/2"):
        cache.add(uri, "fp", 1, fill_with(1))
    touch_order(cache, ["s3://b/m/1", "s3://b/m/2"])
    assert cache.lookup("s3://b/m/1", "fp", use=False) is not None
    assert [e.uri for e in cache.entries()] == ["s3://b/m/1", "s3://b/m/2"]
    assert cache.lookup("s3://b/m/1", "fp") is not None
    assert [e.uri for e in cache.entries()] == ["s3://b/m/2", "s3://b/m/1"]
