"""Two in-process caches: entity features with a time to live, and whole answers by exact input.

Both are LRU dictionaries used from the event loop thread only (no locks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

from inferd.types import Tensors

Row = tuple[float | int | None, ...] | None
"""One entity's parsed feature values in ``fetch`` order (None: field missing); None: entity missing."""


class EntityCache:
    """Entity -> ``Row``, each entry kept for ``ttl_s`` seconds, at most ``size`` entries.

    A missing entity is cached too, so a burst of unknown keys does not reach the store; a change
    in the store is therefore seen at most ``ttl_s`` later. ``ttl_s`` 0 keeps nothing.
    """

    def __init__(self, size: int, ttl_s: float) -> None:
        self._size = size
        self._ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, Row]] = OrderedDict()

    def lookup(self, keys: Iterable[str], now: float) -> tuple[dict[str, Row], list[str]]:
        """The cached rows among ``keys`` (``now`` is ``time.monotonic()``), and the keys not cached."""
        found: dict[str, Row] = {}
        missing: list[str] = []
        items = self._items
        for key in keys:
            entry = items.get(key)
            if entry is not None and entry[0] > now:
                items.move_to_end(key)
                found[key] = entry[1]
            else:
                missing.append(key)
        return found, missing

    def put(self, rows: dict[str, Row], now: float) -> None:
        if self._ttl_s <= 0:
            return
        expires = now + self._ttl_s
        items = self._items
        for key, row in rows.items():
            items[key] = (expires, row)
            items.move_to_end(key)
        while len(items) > self._size:
            items.popitem(last=False)


class PredictionCache:
    """Answers of one model version keyed by signature and the exact bytes of every input.

    Keys hold the input bytes themselves, not a hash of them, so two different inputs never share
    an answer. The cached arrays are shared by every request that hits them: do not modify them.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, Tensors] = OrderedDict()

    @staticmethod
    def key(signature: str, inputs: Tensors) -> Hashable:
        parts: list[Hashable] = [signature]
        for name in sorted(inputs):
            value = inputs[name]
            data = tuple(value.ravel().tolist()) if value.dtype.kind == "O" else value.tobytes()
            parts.append((name, value.dtype.str, value.shape, data))
        return tuple(parts)

    def get(self, key: Hashable) -> Tensors | None:
        outputs = self._items.get(key)
        if outputs is not None:
            self._items.move_to_end(key)
        return outputs

    def put(self, key: Hashable, outputs: Tensors) -> None:
        self._items[key] = outputs
        if len(self._items) > self._size:
            self._items.popitem(last=False)
