"""Weighted traffic splits between the versions of one model.

A model's ``[traffic]`` table (in its ``inferd.toml``) maps a label or a version number to a
weight, e.g. ``stable = 90``, ``canary = 10``. A request that names neither a version nor a label
goes to one of the split's versions, chosen with probability proportional to its weight; a request
that names a version or label is never split. With a traffic key (a request header or gRPC
metadata entry named by ``--traffic_key_header``) the choice is a pure function of the key and the
weights: one key keeps one version while the weights stay. The choice is weighted rendezvous
hashing: each version scores the key, weighted by its share, and the best score wins. So when one
version's weight grows, keys move only to it (from each other version in proportion to its share),
and when one shrinks or leaves, only its keys move; the others' keys stay where they were.

Everything here is pure; the manager resolves a split against its labels at each reconcile.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from inferd.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Split:
    """Resolved weights: version number -> share of the traffic, shares summing to 1.

    Attributes:
        shares: (version, share) pairs, newest version first; every share > 0.
    """

    shares: tuple[tuple[int, float], ...]

    def versions(self) -> list[int]:
        return [version for version, _ in self.shares]

    def percents(self) -> dict[str, float]:
        """Version (as text, for JSON) -> its share in percent, newest version first."""
        return {str(version): round(share * 100, 6) for version, share in self.shares}

    def choose(self, key: str | None, available: Collection[int]) -> int | None:
        """The version a request goes to: for ``key``, the version with the lowest
        ``-ln(key_point(key, version)) / share`` (which is that version with probability its share);
        without one, at random by share. Versions not in ``available`` are left out and their share
        goes to the others. None when no version of the split is available."""
        shares = [(v, s) for v, s in self.shares if v in available]
        if not shares:
            return None
        if key is not None:
            return min(shares, key=lambda pair: -math.log(key_point(key, pair[0])) / pair[1])[0]
        point = random.random() * sum(share for _, share in shares)
        for version, share in shares:
            point -= share
            if point < 0:
                return version
        return shares[-1][0]


def key_point(key: str, version: int) -> float:
    """A traffic key and a version -> a point in (0, 1), the same in every process (not Python's
    ``hash``)."""
    text = f"{key}\x00{version}".encode("utf-8", "surrogatepass")
    return (int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") + 0.5) / 2**64


def resolve(weights: Mapping[str, float], labels: Mapping[str, int]) -> Split | None:
    """A ``[traffic]`` table -> a ``Split``; keys are version numbers (``"3"``) or labels. Weights
    of keys that name the same version add up. None when the table is empty, when every weight is
    0, or when a key names a label that does not exist (the split waits for it; a warning is the
    caller's)."""
    # Finite weights whose sum overflows (1e308 twice) are scaled down first: shares, not NaN.
    scale = max(weights.values()) if math.isinf(sum(weights.values())) else 1.0
    merged: dict[int, float] = {}
    for key, weight in weights.items():
        number = int(key) if key.isdigit() else labels.get(key)
        if number is None:
            return None
        merged[number] = merged.get(number, 0.0) + weight / scale
    total = sum(merged.values())
    if total <= 0:
        return None
    return Split(tuple((v, w / total) for v, w in sorted(merged.items(), reverse=True) if w > 0))


def parse_weights(table: Mapping[str, object], where: str) -> dict[str, float]:
    """``[traffic]`` -> key -> weight, checked: keys are labels (``[A-Za-z0-9_]+``) or version
    numbers, weights finite numbers >= 0, at least one positive.

    Raises:
        ConfigError: naming ``where``, the key and what was expected.
    """
    weights: dict[str, float] = {}
    for key, weight in table.items():
        if not key or not all(c.isalnum() or c == "_" for c in key) or not key.isascii():
            raise ConfigError(f"{where}: key {key!r} must be a label ([A-Za-z0-9_]+) or a version number")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < math.inf:
            raise ConfigError(f"{where}: weight of {key!r} must be a finite number >= 0, got {weight!r}")
        weights[key] = float(weight)
    if weights and not any(weights.values()):
        raise ConfigError(f"{where}: at least one weight must be above 0")
    return weights
