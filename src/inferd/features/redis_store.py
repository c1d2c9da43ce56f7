"""The Redis store: one hash per entity at ``<prefix>:<entity>``, its fields the features.

A lookup is one ``EVAL`` of a small script that runs ``HMGET`` on every key of the batch, so a
batch costs one command and one round trip whatever its size. ``EVAL`` rather than ``EVALSHA``:
the script is 130 bytes, Redis compiles it once, and no lookup needs a second round trip to
load it again after Redis restarts. Connection failures and
lookups cut off by the timeout put the store in a back-off (50 ms doubling to 2 s) during which
lookups fail at once; the first lookup after it reconnects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError, ResponseError, TimeoutError
from redis.retry import Retry

from inferd.features.store import StoreError, Value

_HMGET_ALL = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HMGET', key, unpack(ARGV))
end
return out
"""

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0


def public_name(url: str) -> str:
    """``url`` without user or password: ``redis://host:port/db``."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


def trace_attributes(url: str) -> dict[str, str | int]:
    """A lookup's span attributes, as OpenTelemetry's database semantic conventions name them for
    Redis (``db.system`` is the older name of ``db.system.name``): the command every lookup sends,
    the database number and where the server is, without credentials."""
    parts = urlsplit(url)
    database = parse_qs(parts.query).get("db", [""])[0]
    if parts.scheme != "unix":
        database = parts.path.strip("/") or database
    attributes: dict[str, str | int] = {
        "db.system.name": "redis",
        "db.system": "redis",
        "db.operation.name": "EVAL",
        "db.namespace": database or "0",
    }
    if parts.scheme == "unix":
        return attributes | {"network.transport": "unix", "server.address": parts.path}
    return attributes | {
        "server.address": parts.hostname or "localhost",
        "server.port": parts.port or 6379,
        "network.transport": "tcp",
    }


class RedisStore:
    """Feature hashes on the Redis server at ``url`` (redis-py's URL forms). Event loop thread only.

    Args:
        connect_timeout_s: longest wait to open a connection; lookups are also bounded by the
            caller's timeout.
    """

    def __init__(self, url: str, prefix: str, connect_timeout_s: float = 1.0) -> None:
        self._name = public_name(url)
        self._trace_attributes = trace_attributes(url)
        self._prefix = f"{prefix}:"
        self._client = aioredis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._failures = 0
        self._retry_at = 0.0

    @property
    def name(self) -> str:
        return self._name

    @property
    def trace_attributes(self) -> Mapping[str, str | int]:
        return self._trace_attributes

    async def get(self, entities: Sequence[str], names: Sequence[str]) -> list[list[Value] | None]:
        now = time.monotonic()
        if now < self._retry_at:
            raise StoreError("connection", f"unreachable; next try in {self._retry_at - now:.2f} s")
        prefix = self._prefix
        try:
            reply = await self._client.eval(
                _HMGET_ALL, len(entities), *[prefix + e for e in entities], *names
            )
        except (ConnectionError, TimeoutError, OSError) as exc:
            self._back_off(now)
            raise StoreError("connection", str(exc) or type(exc).__name__) from None
        except asyncio.CancelledError:  # the caller's lookup timeout
            self._back_off(now)
            raise
        except ResponseError as exc:
            raise StoreError("garbage", str(exc)) from None
        except RedisError as exc:
            raise StoreError("garbage", f"{type(exc).__name__}: {exc}") from None
        self._failures = 0
        return _rows(reply, len(entities), len(names))

    def _back_off(self, now: float) -> None:
        self._failures += 1
        self._retry_at = now + min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._failures - 1))

    async def close(self) -> None:
        await self._client.aclose()


def _rows(reply: object, entities: int, names: int) -> list[list[Value] | None]:
    """The script's reply, checked: per entity its values, or None when every field is missing."""
    if not isinstance(reply, list) or len(reply) != entities:
        raise StoreError("garbage", f"expected {entities} replies, got {type(reply).__name__}")
    rows: list[list[Value] | None] = []
    for values in reply:
        if not isinstance(values, list) or len(values) != names:
            raise StoreError("garbage", f"expected {names} values per entity, got {values!r:.80}")
        rows.append(None if all(v is None for v in values) else values)
    return rows
