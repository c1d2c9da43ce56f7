"""The feature stores a server opens: each distinct store once, all closed at shutdown."""

from __future__ import annotations

import threading
from pathlib import Path

from inferd.config import FeatureSettings
from inferd.features.store import FeatureStore


class FeatureStores:
    """Opens each distinct store once and closes them all at shutdown. Owned by the server.
    ``open`` may be called from several load threads at once."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str, tuple[str, ...]], FeatureStore] = {}
        self._lock = threading.Lock()

    def open(self, settings: FeatureSettings) -> FeatureStore:
        """The store ``settings`` name; nothing is connected or read until its first ``get``."""
        key = (settings.store, settings.key_prefix, settings.entity)
        with self._lock:
            store = self._open.get(key)
            if store is None:
                if "://" in settings.store:
                    from inferd.features.redis_store import RedisStore  # imports redis, an extra

                    store = RedisStore(settings.store, settings.key_prefix)
                else:
                    from inferd.features.embedded import EmbeddedStore

                    store = EmbeddedStore(Path(settings.store), settings.entity)
                self._open[key] = store
        return store

    async def close(self) -> None:
        stores, self._open = list(self._open.values()), {}
        for store in stores:
            await store.close()
