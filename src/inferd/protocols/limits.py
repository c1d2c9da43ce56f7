"""The largest request the adapters decode, and the checks that refuse more before allocating.

Every protocol applies the same limits: a declared shape is checked before any array of that
shape exists, so a tiny request that declares a huge tensor (a "zip bomb") costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from inferd.config import ServerConfig
from inferd.errors import ConfigError, InvalidArgument, ResourceExhausted, Unavailable
from inferd.types import Tensors

MAX_RANK = 32
"""The most dimensions a tensor may have: numpy 1's limit (numpy 2 allows 64)."""
MAX_JSON_DEPTH = 512
"""The deepest --max_json_depth: JSON values are walked recursively, within Python's stack."""
STRING_OBJECT_BYTES = 64
"""What one decoded string element (BYTES, DT_STRING) holds beside its characters: a Python
``bytes`` or ``str`` object and its slot in the array (CPython 3.11: 33 or 49 bytes, and 8),
rounded up."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Limits on one request, each named after its ``inferd serve`` flag (defaults: ``ServerConfig``).

    Attributes:
        max_tensor_elements: elements in one tensor, and the largest dimension of a shape.
        max_json_depth: nesting of JSON lists (and b64 objects) in one tensor's value.
        max_string_bytes: bytes in one string (BYTES / DT_STRING) element, after base64 decoding.
        max_instances: rows of a TF Serving ``instances`` list, and examples of a classify or
            regress request.
        max_request_bytes: bytes of one request, and of a classify or regress context repeated
            in each serialized example (``repeated_context``).
    """

    max_tensor_elements: int
    max_json_depth: int
    max_string_bytes: int
    max_instances: int
    max_request_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        names = (
            "max_tensor_elements",
            "max_json_depth",
            "max_string_bytes",
            "max_instances",
            "max_request_bytes",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_json_depth > MAX_JSON_DEPTH:
            raise ConfigError(f"--max_json_depth must be <= {MAX_JSON_DEPTH}, got {self.max_json_depth}")

    @classmethod
    def of(cls, config: ServerConfig) -> RequestLimits:
        """The limits ``config`` sets.

        Raises:
            ConfigError: a limit is below 1, or ``max_json_depth`` is over ``MAX_JSON_DEPTH``.
        """
        return cls(
            config.max_tensor_elements,
            config.max_json_depth,
            config.max_string_bytes,
            config.max_instances,
            config.max_request_bytes,
        )

    def elements(self, name: str, shape: Sequence[int]) -> int:
        """The element count of a declared ``shape`` for input ``name``, checked before allocation.

        Raises:
            InvalidArgument: a dimension is negative, or there are more than ``MAX_RANK``.
            ResourceExhausted: a dimension or the count is over ``max_tensor_elements``.
        """
        if len(shape) > MAX_RANK:
            raise InvalidArgument(
                f"input {name!r}: shape has {len(shape)} dims; at most {MAX_RANK} are allowed"
            )
        if min(shape, default=0) < 0:
            raise InvalidArgument(f"input {name!r}: shape {_brief(shape)} has a negative dim")
        count = math.prod(shape)
        if count > self.max_tensor_elements or max(shape, default=0) > self.max_tensor_elements:
            raise ResourceExhausted(
                f"input {name!r}: shape {_brief(shape)} is over the limit of {self.max_tensor_elements} "
                "elements per tensor (--max_tensor_elements)"
            )
        return count

    def string(self, name: str, size: int) -> None:
        """Check one string element of ``size`` bytes.

        Raises:
            ResourceExhausted: ``size`` is over ``max_string_bytes``.
        """
        if size > self.max_string_bytes:
            raise ResourceExhausted(
                f"input {name!r}: a string of {size} bytes is over the limit of {self.max_string_bytes} "
                "bytes (--max_string_bytes)"
            )

    def repeated_context(self, name: str, context_bytes: int, examples: int) -> None:
        """Check a serialized classify or regress context of ``context_bytes`` repeated in each of
        ``examples`` serialized examples fed to input ``name`` (a ``tf.Example`` parser, as TF
        Serving feeds it): a small request could otherwise make gigabytes of them.

        Raises:
            ResourceExhausted: they take more than ``max_request_bytes``.
        """
        if context_bytes * examples > self.max_request_bytes:
            raise ResourceExhausted(
                f"input {name!r}: the context ({context_bytes} bytes serialized) repeated in each of "
                f"{examples} examples takes {context_bytes * examples} bytes, over the limit of "
                f"{self.max_request_bytes} bytes (--max_request_bytes); send fewer examples per request"
            )

    def text(self, name: str, array: np.ndarray) -> None:
        """Check the strings of a numpy text array (``<U`` dtype, 4 bytes a character) as UTF-8.

        Raises:
            ResourceExhausted: a string is over ``max_string_bytes``.
        """
        if array.dtype.kind == "U" and array.size and array.dtype.itemsize > self.max_string_bytes:
            self.string(name, max(len(item.encode()) for item in array.reshape(-1).tolist()))

    def instances(self, what: str, count: int) -> None:
        """Check the number of rows or examples, ``what`` naming the field.

        Raises:
            ResourceExhausted: ``count`` is over ``max_instances``.
        """
        if count > self.max_instances:
            raise ResourceExhausted(
                f"'{what}' has {count} entries, over the limit of {self.max_instances} (--max_instances)"
            )

    def depth(self, name: str, depth: int) -> None:
        """Check the nesting depth reached in one tensor's JSON value.

        Raises:
            InvalidArgument: ``depth`` is over ``max_json_depth``.
        """
        if depth > self.max_json_depth:
            raise InvalidArgument(
                f"input {name!r}: the JSON value is nested deeper than the limit of {self.max_json_depth} "
                "levels (--max_json_depth)"
            )


class InflightBytes:
    """The server-wide budget of bytes held by requests in flight: REST bodies (as they arrive,
    after their ``Content-Length`` was admitted beside what is held) and gRPC request messages
    (from their size once received, before they are parsed), released when the request ends
    however it ends.

    Used on the event loop only (not thread-safe). ``limit`` 0 means no budget.
    """

    def __init__(self, limit: int, max_request_bytes: int) -> None:
        """Raises:
        ConfigError: ``limit`` is negative, or below ``max_request_bytes`` (a request of the
            largest allowed size could never be served).
        """
        if limit < 0 or 0 < limit < max_request_bytes:
            raise ConfigError(
                f"--max_inflight_bytes must be 0 (no budget) or >= --max_request_bytes "
                f"({max_request_bytes}), got {limit}"
            )
        self.limit = limit
        self.held = 0

    def reservation(self) -> Reservation:
        """A reservation of 0 bytes for one request, to grow as its size becomes known."""
        return Reservation(self)

    def _check(self, size: int) -> None:
        if self.limit and self.held + size > self.limit:
            raise Unavailable(
                f"the server holds {self.held} bytes of requests in flight; {size} more would pass "
                f"the limit of {self.limit} bytes (--max_inflight_bytes); retry"
            )

    def _take(self, size: int) -> None:
        self._check(size)
        self.held += size


class Reservation:
    """The bytes one request holds of an ``InflightBytes`` budget; ``release`` gives them back
    (idempotent, so a ``finally`` may always call it)."""

    __slots__ = ("_budget", "_strings", "held")

    def __init__(self, budget: InflightBytes) -> None:
        self._budget = budget
        self.held = 0
        self._strings = 0  # of ``held``: what decoded string elements take (``hold_strings``)

    def hold_strings(self, elements: int) -> None:
        """Hold also what ``elements`` decoded string elements take: a Python object each
        (``STRING_OBJECT_BYTES``), and their characters, a copy of at most the request's own
        bytes. A 57 MiB V2 binary body of 10 million two-byte strings took 536 MiB decoded.

        Raises:
            Unavailable: the budget cannot hold them now; what was held stays held.
            ResourceExhausted: their objects alone are more than the whole budget.
        """
        request = self.held - self._strings
        objects = elements * STRING_OBJECT_BYTES
        limit = self._budget.limit
        if limit and objects > limit:
            raise ResourceExhausted(
                f"the request's {elements} string elements take about {objects} bytes decoded, more "
                f"than the server holds for all requests in flight ({limit} bytes, "
                "--max_inflight_bytes); send them in smaller requests"
            )
        total = request + objects + request
        if limit:  # the largest request the budget admits (--max_request_bytes) stays servable
            total = min(total, limit)
        if total - request > self._strings:
            self.grow_to(total)
            self._strings = total - request

    def admit(self, size: int) -> None:
        """Check that ``size`` bytes in all would fit beside what the budget holds now, without
        holding them: a body declared but not sent yet holds nothing, so that clients who
        declare large bodies and trickle them in cannot take the budget from everyone else.

        Raises:
            Unavailable: they would not fit now.
        """
        if size > self.held:
            self._budget._check(size - self.held)

    def grow_to(self, size: int) -> None:
        """Hold ``size`` bytes in all (no change when it holds as many already).

        Raises:
            Unavailable: the budget cannot give the difference; what was held stays held.
        """
        if size > self.held:
            self._budget._take(size - self.held)
            self.held = size

    def release(self) -> None:
        """Give back everything held."""
        self._budget.held -= self.held
        self.held = self._strings = 0


HELD: ContextVar[Reservation | None] = ContextVar("inferd_held_bytes", default=None)
"""The running request's reservation: set by the REST application and by the gRPC port's
budget gate, in the request's own task."""


def hold_strings(inputs: Tensors) -> None:
    """Hold in the running request's reservation (``HELD``) what its decoded string tensors
    take (``Reservation.hold_strings``), before they become objects for the model; numeric
    tensors take no more than the request's bytes.

    Raises:
        Unavailable: over the ``--max_inflight_bytes`` budget.
    """
    elements = 0
    for value in inputs.values():
        if value.dtype.kind in "OUS":  # numpy's text arrays become objects for a string input
            elements += value.size
    if elements and (reservation := HELD.get()) is not None:
        reservation.hold_strings(elements)


def _brief(shape: Sequence[int]) -> str:
    """A shape for a message, cut short when a hostile request gives thousands of dims."""
    dims = list(shape)
    return str(dims) if len(dims) <= 8 else f"[{', '.join(map(str, dims[:8]))}, ...] ({len(dims)} dims)"
