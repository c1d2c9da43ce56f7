"""Two in-process caches: entity features with a time to live, and whole answers by exact input.

Both hold what clients choose (entity keys, request tensors), so both are bounded by bytes as well
as by entries: an entry's bytes are its key's and its value's (``len`` of strings and bytes,
``nbytes`` of arrays) plus a fixed allowance for the containers. Both are dictionaries used from
the event loop thread only (no locks).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np

from inferd.types import Tensors

Key = tuple[Any, ...]
"""A ``PredictionCache`` key: the signature's name, the key's size in bytes, then per input its
name, dtype, shape and data."""

Row = tuple[float | int | None, ...] | None
"""One entity's parsed feature values in ``fetch`` order (None: field missing); None: entity missing."""

ENTRY_OVERHEAD_BYTES = 200
"""Bytes counted per entry besides its key and value: the dictionary slot, tuples and headers."""

MAX_NEGATIVE_KEY_BYTES = 1024
"""A missing entity whose key is longer than this is not cached: real keys are short, and an
unknown long key (one a client made up) would otherwise buy cache room with every request."""


class EntityCache:
    """Entity -> ``Row``, each entry kept for ``ttl_s`` seconds, within ``size`` entries and
    ``max_bytes`` bytes.

    A missing entity is cached too (unless its key is over ``MAX_NEGATIVE_KEY_BYTES``), so a burst
    of unknown keys does not reach the store; a change in the store is therefore seen at most
    ``ttl_s`` later. ``ttl_s`` 0 keeps nothing. Entries leave in the order they were fetched, which
    is the order they expire in: expired entries are dropped at every ``lookup`` and ``put``, and
    when a bound is reached the oldest go first.
    """

    def __init__(self, size: int, ttl_s: float, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._size = size
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, tuple[float, Row, int]] = OrderedDict()

    @property
    def bytes(self) -> int:
        """Bytes the entries take, as counted against ``max_bytes``."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, keys: Iterable[str], now: float) -> tuple[dict[str, Row], list[str]]:
        """The cached rows among ``keys`` (``now`` is ``time.monotonic()``), and the keys not cached."""
        self._expire(now)
        found: dict[str, Row] = {}
        missing: list[str] = []
        items = self._items
        for key in keys:
            entry = items.get(key)
            if entry is not None and entry[0] > now:
                found[key] = entry[1]
            else:
                missing.append(key)
        return found, missing

    def put(self, rows: dict[str, Row], now: float) -> None:
        """Keep ``rows``, fetched at ``now``, for ``ttl_s``; evict the oldest past a bound."""
        if self._ttl_s <= 0:
            return
        self._expire(now)
        expires = now + self._ttl_s
        items = self._items
        for key, row in rows.items():
            key_bytes = sys.getsizeof(key)
            if row is None and key_bytes > MAX_NEGATIVE_KEY_BYTES:
                continue
            cost = key_bytes + ENTRY_OVERHEAD_BYTES + (0 if row is None else 16 * len(row))
            if cost > self._max_bytes:
                continue
            old = items.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            items[key] = (expires, row, cost)
            self._bytes += cost
        while items and (len(items) > self._size or self._bytes > self._max_bytes):
            self._bytes -= items.popitem(last=False)[1][2]

    def _expire(self, now: float) -> None:
        items = self._items
        while items:
            key, entry = next(iter(items.items()))
            if entry[0] > now:
                return
            del items[key]
            self._bytes -= entry[2]


class PredictionCache:
    """Answers of one model version keyed by signature and the exact bytes of every input, within
    ``size`` entries and ``max_bytes`` bytes (keys and answers together).

    Keys hold the input bytes themselves, not a hash of them, so two different inputs never share
    an answer. A request whose inputs alone are over ``max_bytes`` is not cached at all (``key``
    gives None and costs no copy). The cached arrays are shared by every request that hits them:
    do not modify them. The least recently used entries go first.
    """

    def __init__(self, size: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[Key, tuple[Tensors, int]] = OrderedDict()

    @property
    def bytes(self) -> int:
        """Bytes the entries take, as counted against ``max_bytes``."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def key(self, signature: str, inputs: Tensors) -> Key | None:
        """The key of a request, or None when it alone would not fit in ``max_bytes`` (then no
        input is copied). The key's second item is its size in bytes: the signature's name, and
        each input's name, shape and data (an object array's item references and items)."""
        size = len(signature)
        for name, value in inputs.items():
            data_bytes = value.nbytes if value.dtype.kind != "O" else value.nbytes + _items_bytes(value)
            size += len(name) + 8 * value.ndim + data_bytes
        if size > self._max_bytes:
            return None
        parts: list[Hashable] = [signature, size]
        for name in sorted(inputs) if len(inputs) > 1 else inputs:
            value = inputs[name]
            data = tuple(value.ravel().tolist()) if value.dtype.kind == "O" else value.tobytes()
            parts.append((name, value.dtype.str, value.shape, data))
        return tuple(parts)

    def get(self, key: Key | None) -> Tensors | None:
        if key is None:
            return None
        entry = self._items.get(key)
        if entry is None:
            return None
        self._items.move_to_end(key)
        return entry[0]

    def put(self, key: Key | None, outputs: Tensors) -> None:
        """Keep ``outputs`` for ``key`` unless the pair alone is over ``max_bytes``; evict the
        least recently used entries past a bound."""
        if key is None:
            return
        cost: int = key[1] + ENTRY_OVERHEAD_BYTES
        for value in outputs.values():
            cost += value.nbytes if value.dtype.kind != "O" else value.nbytes + _items_bytes(value)
        if cost > self._max_bytes:
            return
        items = self._items
        old = items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        items[key] = (outputs, cost)
        self._bytes += cost
        while items and (len(items) > self._size or self._bytes > self._max_bytes):
            self._bytes -= items.popitem(last=False)[1][1]


def _items_bytes(value: np.ndarray) -> int:
    """The bytes of an object array's items: ``len`` of strings and bytes, else their size."""
    return sum(len(item) if isinstance(item, str | bytes) else sys.getsizeof(item) for item in value.flat)
