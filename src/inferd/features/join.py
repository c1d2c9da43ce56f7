"""Joining looked-up features into a request: the plan per signature (``plan_join``) and the
per-version join (``FeatureJoin``).

A model's ``[features]`` table (see ``FeatureSettings``) names the entity input(s) a request
carries, the features to fetch and how they join with the request's own inputs to form the
model's inputs. ``FeatureJoin`` turns a request-side batch into model inputs: it reads the rows
of the batch's distinct entities from an ``EntityCache``, fetches the rest from the
``FeatureStore`` in one round trip under the lookup timeout (merged with the lookups of other
requests that wait at the same time, see ``LookupBatcher``), and assembles the columns.

Each join leaves in ``tracing.STORE_LOOKUP``, for the request's own task, what it asked the store
(None when every entity came from the cache): the request's span for the lookup is made from it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferd.config import FeatureSettings
from inferd.errors import InvalidArgument, ModelLoadError, NotFound, Unavailable
from inferd.features.cache import EntityCache, Row
from inferd.features.coalesce import LookupBatcher
from inferd.features.store import FeatureStore, StoreError, Value
from inferd.metrics import FeatureStats
from inferd.tracing import STORE_LOOKUP, StoreLookup
from inferd.types import Signature, Tensors, TensorSpec, dtype_of


@dataclass(frozen=True, slots=True)
class JoinPlan:
    """How one signature's model inputs are made: ``request`` is what the caller sends;
    ``assembled`` maps a model input to its columns (request inputs and fetched features)."""

    request: Signature
    assembled: Mapping[str, tuple[TensorSpec, tuple[str, ...]]]


def plan_join(settings: FeatureSettings, signatures: Mapping[str, Signature]) -> dict[str, JoinPlan]:
    """A plan for each signature that takes every model input ``settings.inputs`` names.

    Raises:
        ModelLoadError: no signature takes those inputs, or an input's shape cannot hold its
            columns, or a feature dtype is not numeric, or a default is not a value of its
            feature's integer dtype; the message names the key.
    """
    for name in settings.fetch:
        dtype = feature_dtype(settings, name)
        if dtype.kind not in "fiu":
            raise ModelLoadError(f"[features] dtype of {name!r} must be a number type, got {dtype.kind!r}")
        default = settings.defaults.get(name)
        if default is not None and dtype.kind in "iu":
            bounds = np.iinfo(dtype)
            if not (float(default).is_integer() and bounds.min <= default <= bounds.max):
                raise ModelLoadError(
                    f"[features] defaults.{name}: {default!r} is not an integer in the range of {dtype.name}"
                )
    plans = {}
    for signature in signatures.values():
        specs = {spec.name: spec for spec in signature.inputs}
        if not set(settings.inputs) <= set(specs):
            continue
        assembled, request = {}, {n: TensorSpec(n, np.dtype(object), (-1,)) for n in settings.entity}
        for name, columns in settings.inputs.items():
            spec = specs[name]
            fits = spec.shape is None or (len(spec.shape) == 1 and len(columns) == 1)
            fits = fits or (
                spec.shape is not None and len(spec.shape) == 2 and spec.shape[1] in (-1, len(columns))
            )
            if not fits:
                raise ModelLoadError(
                    f"[features] inputs.{name} has {len(columns)} column(s); "
                    f"the model takes {spec.describe()}"
                )
            assembled[name] = (spec, columns)
            for column in columns:
                if column not in settings.fetch:
                    request.setdefault(column, TensorSpec(column, spec.dtype, (-1,)))
        for spec in signature.inputs:
            if spec.name not in assembled:
                if spec.name in request:
                    raise ModelLoadError(f"[features] column {spec.name!r} is also a model input")
                request[spec.name] = spec
        plans[signature.name] = JoinPlan(
            Signature(signature.name, tuple(request.values()), signature.outputs, signature.method), assembled
        )
    if not plans:
        raise ModelLoadError(f"[features] inputs {sorted(settings.inputs)}: no signature takes them all")
    return plans


def feature_dtype(settings: FeatureSettings, name: str) -> np.dtype[Any]:
    try:
        return dtype_of(settings.dtypes.get(name, "float64")).numpy
    except KeyError:
        raise ModelLoadError(f"[features] dtypes.{name}: unknown dtype {settings.dtypes[name]!r}") from None


def parse_row(values: list[Value] | None, dtypes: Sequence[np.dtype[Any]]) -> Row:
    """A store's values for one entity, parsed as ``dtypes``.

    Raises:
        ValueError: a value is not a number of its dtype, or an integer out of its dtype's range
            (OverflowError: an infinite float for an integer dtype).
    """
    if values is None:
        return None
    if len(values) != len(dtypes):
        raise ValueError(f"{len(values)} values for {len(dtypes)} features")
    return tuple(
        None if value is None else (float(value) if dtype.kind == "f" else _integer(value, dtype))
        for value, dtype in zip(values, dtypes, strict=True)
    )


def _integer(value: bytes | str | float | int, dtype: np.dtype[Any]) -> int:
    number = int(value)
    bounds = np.iinfo(dtype)
    if not bounds.min <= number <= bounds.max:
        raise ValueError(f"{number} is out of range for {dtype.name}")
    return number


class FeatureJoin:
    """Joins looked-up features into one model version's requests. Event loop thread only.

    Args:
        model: the model name, for messages.
        plans: from ``plan_join``.
        store: where features come from; shared with other models, owned by ``FeatureStores``.
        stats: where lookups are counted.
    """

    def __init__(
        self,
        model: str,
        settings: FeatureSettings,
        plans: Mapping[str, JoinPlan],
        store: FeatureStore,
        stats: FeatureStats,
    ) -> None:
        self._model = model
        self._settings = settings
        self._plans = plans
        self._store = store
        self._stats = stats
        self._cache = EntityCache(settings.cache_size, settings.cache_ttl_s, settings.cache_bytes)
        self._dtypes = [feature_dtype(settings, name) for name in settings.fetch]
        self._timeout_s = settings.lookup_timeout_ms / 1000
        self._lookups = LookupBatcher(store, settings.fetch, self._timeout_s, stats)

    def request_signature(self, signature: Signature) -> Signature:
        """What a caller sends for ``signature``: itself when no features join into it."""
        plan = self._plans.get(signature.name)
        return signature if plan is None else plan.request

    async def join(self, signature: str, inputs: Tensors, deadline: float | None) -> Tensors:
        """Model inputs for ``signature`` from request ``inputs`` conformed to its request signature.

        Raises:
            InvalidArgument: the entity inputs and the request's own columns do not all have the
                same number of rows; the message names them.
            Unavailable: the store failed or took longer than the lookup timeout, unless the
                settings fall back to defaults; the message names the store.
            NotFound: an entity or one of its features is missing and has no default.
        """
        joined, missing = await self.join_rows(signature, inputs, deadline)
        if missing:
            raise NotFound(next(iter(missing.values())))
        return joined

    async def join_rows(
        self, signature: str, inputs: Tensors, deadline: float | None
    ) -> tuple[Tensors, dict[int, str]]:
        """Like ``join``, but a row whose entity or a feature without default is missing does not
        fail the call: it holds zeros for those features and comes back, by row offset, with a
        message naming its key.

        Raises:
            InvalidArgument, Unavailable: as ``join``.
        """
        plan = self._plans.get(signature)
        if plan is None:
            return inputs, {}
        _check_rows(inputs, [*self._settings.entity, *(c for _, cs in plan.assembled.values() for c in cs)])
        keys = _entity_keys(inputs, self._settings.entity)
        rows = await self._rows(dict.fromkeys(keys), deadline)
        features, missing = self._columns(keys, rows)
        joined = {name: value for name, value in inputs.items() if name not in self._settings.entity}
        for name, (spec, columns) in plan.assembled.items():
            parts = [features[c] if c in features else joined.pop(c) for c in columns]
            if spec.shape is not None and len(spec.shape) == 1:
                joined[name] = parts[0].astype(spec.dtype, copy=False)
            else:
                # One assignment into a preallocated matrix: a fifth of np.stack's cost on the
                # small batches that realtime requests carry.
                matrix = np.empty((len(keys), len(parts)), dtype=spec.dtype)
                matrix.T[...] = parts
                joined[name] = matrix
        return joined, missing

    async def _rows(self, keys: dict[str, None], deadline: float | None) -> dict[str, Row]:
        now = time.monotonic()
        rows, missing = self._cache.lookup(keys, now)
        stats = self._stats
        stats.cache.hits += len(rows)
        stats.cache.misses += len(missing)
        if not missing:
            STORE_LOOKUP.set(None)
            return rows
        timeout_s = self._timeout_s if deadline is None else min(self._timeout_s, deadline - now)
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                fetched = await self._lookups.fetch(missing)
            STORE_LOOKUP.set(
                StoreLookup(sent, time.perf_counter(), len(missing), self._store.trace_attributes)
            )
            parsed = {key: self._parse(key, values) for key, values in zip(missing, fetched, strict=True)}
        except (StoreError, TimeoutError) as exc:
            failure = exc if isinstance(exc, StoreError) else StoreError("timeout", "no answer")
            lookup = StoreLookup(
                sent, time.perf_counter(), len(missing), self._store.trace_attributes, failure.kind
            )
            STORE_LOOKUP.set(lookup)
            stats.error(failure.kind)
            if self._settings.on_store_error == "defaults":
                return rows | dict.fromkeys(missing)
            raise Unavailable(
                f"feature store {self._store.name} failed for model {self._model} ({failure}); "
                f"timeout {self._settings.lookup_timeout_ms:g} ms"
            ) from None
        self._cache.put(parsed, now)
        return rows | parsed

    def _parse(self, key: str, values: list[Value] | None) -> Row:
        try:
            return parse_row(values, self._dtypes)
        except (TypeError, ValueError, OverflowError) as exc:
            raise StoreError("garbage", f"entity {key!r} has unreadable features: {exc!s:.200}") from None

    def _columns(self, keys: list[str], rows: dict[str, Row]) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Each fetched feature's column, and the rows lacking a feature that has no default
        (first such feature in ``fetch`` order first)."""
        settings = self._settings
        columns = {}
        missing: dict[int, str] = {}
        for j, (name, dtype) in enumerate(zip(settings.fetch, self._dtypes, strict=True)):
            default = settings.defaults.get(name)
            values = []
            for i, key in enumerate(keys):
                row = rows[key]
                value = None if row is None else row[j]
                if value is None:
                    if default is None:
                        what = "is not in" if row is None else f"has no feature {name!r} in"
                        entity = f"{'/'.join(settings.entity)} {key!r:.200}"  # a key may be megabytes
                        missing.setdefault(i, f"{entity} {what} feature store {self._store.name}")
                        value = 0
                    else:
                        value = default
                values.append(value)
            columns[name] = np.array(values, dtype=dtype)
        return columns, missing


def _check_rows(inputs: Tensors, names: Sequence[str]) -> None:
    """Raise InvalidArgument unless the ``names`` among ``inputs`` have the same number of rows."""
    rows = {name: len(inputs[name]) for name in names if name in inputs}
    if len(set(rows.values())) > 1:
        first = next(iter(rows))
        other = next(name for name, n in rows.items() if n != rows[first])
        raise InvalidArgument(
            f"input {other!r}: expected {rows[first]} rows, as input {first!r} has, got {rows[other]}"
        )


def _entity_keys(inputs: Tensors, entity: Sequence[str]) -> list[str]:
    parts = [[_text(v) for v in inputs[name].tolist()] for name in entity]
    return parts[0] if len(parts) == 1 else [":".join(p) for p in zip(*parts, strict=True)]


def _text(value: object) -> str:
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)
