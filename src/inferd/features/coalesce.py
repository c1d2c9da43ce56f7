"""Lookups that wait for the store go out together: while one lookup is in flight, the lookups
that arrive are held and then sent as one, so under concurrency a store sees a few large round
trips instead of one per request. A lone request is not held: it is sent at once.

Every round trip runs in a task of its own, bounded by the lookup timeout alone: a caller that
stops waiting (its request's deadline came first) does not cut it short, so one client's short
deadlines cannot put the store in its back-off for everyone else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from inferd.features.store import FeatureStore, StoreError, Value
from inferd.metrics import FeatureStats

Rows = list[list[Value] | None]


class LookupBatcher:
    """Fetches ``names`` for entities from ``store``, merging concurrent lookups. Event loop only.

    Args:
        timeout_s: longest a merged lookup may take; each caller also bounds its own wait.
        stats: counts round trips and their latency.
    """

    def __init__(
        self, store: FeatureStore, names: Sequence[str], timeout_s: float, stats: FeatureStats
    ) -> None:
        self._store = store
        self._names = names
        self._timeout_s = timeout_s
        self._stats = stats
        self._busy = False
        self._waiting: list[tuple[list[str], asyncio.Future[Rows]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def fetch(self, entities: list[str]) -> Rows:
        """Per entity, its values in ``names`` order or None (see ``FeatureStore.get``).

        Raises:
            StoreError: the store failed, or took longer than the lookup timeout.
        """
        future: asyncio.Future[Rows] = asyncio.get_running_loop().create_future()
        self._waiting.append((entities, future))
        if not self._busy:
            self._busy = True
            self._send_waiting()
        return await future

    async def _get(self, entities: list[str]) -> Rows:
        started = time.monotonic()
        try:
            return await self._store.get(entities, self._names)
        finally:
            self._stats.round_trips += 1
            self._stats.lookup.observe(time.monotonic() - started)

    def _send_waiting(self) -> None:
        if not self._waiting:
            self._busy = False
            return
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._merged(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _merged(self, batch: list[tuple[list[str], asyncio.Future[Rows]]]) -> None:
        keys = list(dict.fromkeys(key for entities, _ in batch for key in entities))
        try:
            async with asyncio.timeout(self._timeout_s):
                rows = await self._get(keys)
        except (StoreError, TimeoutError) as exc:
            failure = exc if isinstance(exc, StoreError) else StoreError("timeout", "no answer")
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
        except Exception as exc:  # a store's unexpected error reaches its callers as it is
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            by_key = dict(zip(keys, rows, strict=True))
            for entities, future in batch:
                if not future.done():
                    future.set_result([by_key[key] for key in entities])
        finally:
            self._send_waiting()
