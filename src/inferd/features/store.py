"""The seam between inferd and a feature store: the ``FeatureStore`` protocol and its error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

Value = bytes | str | float | int | None
"""A stored feature value as a store returns it: bytes or text to parse, or a number."""


class FeatureStore(Protocol):
    """An online store of feature values by entity. Used from the event loop thread.

    ``name`` identifies the store in messages and metric labels, without credentials.
    """

    @property
    def name(self) -> str: ...

    @property
    def trace_attributes(self) -> Mapping[str, str | int]:
        """OpenTelemetry attributes of a lookup's span: for a store reached over the network, the
        semantic conventions' database client attributes (``db.system.name``, ``server.address``,
        ``server.port``, ...); empty for a store in this process."""
        ...

    async def get(self, entities: Sequence[str], names: Sequence[str]) -> list[list[Value] | None]:
        """The values of ``names`` for each entity, in one round trip: per entity, a list in
        ``names`` order with None for a missing feature, or None when the entity is unknown.

        Raises:
            StoreError: the store cannot be reached or answered something unreadable.
        """
        ...

    async def close(self) -> None: ...


class StoreError(Exception):
    """The store failed; ``kind`` (``connection``, ``timeout``, ``garbage``, ``loading``) labels
    the metric, the message says what happened."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
