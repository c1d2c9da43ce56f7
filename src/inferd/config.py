"""Server and model configuration: TF Serving's flags and model config file, and ``inferd.toml``.

Precedence, highest first: command-line flags, ``INFERD_*`` environment variables (applied by
the CLI), the model config file and each model's ``inferd.toml``, then the defaults here.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from google.protobuf import text_format
from google.protobuf.message import Message

from inferd._proto import batching_parameters_pb2 as bp
from inferd._proto import model_server_config_pb2 as pb
from inferd.errors import ConfigError
from inferd.traffic import parse_weights

SETTINGS_FILE = "inferd.toml"

# Object-store URI scheme -> (fsspec protocol, the inferd extra that installs its filesystem)
OBJECT_STORES: Mapping[str, tuple[str, str]] = {
    "s3": ("s3", "s3"),
    "s3a": ("s3", "s3"),
    "gs": ("gcs", "gcs"),
    "gcs": ("gcs", "gcs"),
    "az": ("az", "azure"),
    "abfs": ("abfs", "azure"),
    "abfss": ("abfs", "azure"),
}


def model_location(text: str) -> Path | str:
    """Where a model or repository lives: a local ``Path`` for a folder path or a ``file://``
    URI; the URI itself (without a trailing slash) for an object store (``OBJECT_STORES``).

    Raises:
        ConfigError: a URI whose scheme is not ``file`` or an object store.
    """
    scheme, sep, rest = text.partition("://")
    if not sep or "/" in scheme:
        return Path(text)
    scheme = scheme.lower()
    if scheme == "file":
        return Path(rest)
    if scheme not in OBJECT_STORES:
        schemes = ", ".join(sorted(OBJECT_STORES))
        raise ConfigError(f"model path {text!r}: expected a folder or a URI of scheme file, {schemes}")
    return text.rstrip("/")


"""Per-model settings, read from ``<base_path>/inferd.toml``."""


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which versions on disk to serve: the latest ``num_versions``, all of them, or a list."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, on_disk: Iterable[int]) -> set[int]:
        """Return the versions to serve (the aspired versions) among those found on disk."""
        found = sorted(set(on_disk), reverse=True)
        if self.kind == "all":
            return set(found)
        if self.kind == "specific":
            return set(found) & set(self.versions)
        return set(found[: max(self.num_versions, 1)])

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return f"specific {list(self.versions)}"
        return "all"


@dataclass(frozen=True, slots=True)
class BatchingParameters:
    """How concurrent requests for one model version are merged into one ``predict`` call.

    Field names and meanings are TF Serving's ``BatchingParameters``; ``target_p99_ms`` switches
    to latency-aware (adaptive) batching, where batch size and wait follow the measured batch
    latency and ``batch_timeout_micros`` and ``max_batch_size`` are only upper bounds.
    """

    max_batch_size: int = 32
    batch_timeout_micros: int = 1000
    max_enqueued_batches: int = 16
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    target_p99_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batching: {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ConfigError(f"batching: batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")
        sizes = self.allowed_batch_sizes
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[0] < 1):
            raise ConfigError(f"batching: allowed_batch_sizes must be increasing and >= 1, got {list(sizes)}")
        if sizes and sizes[-1] != self.max_batch_size:
            raise ConfigError("batching: Last entry in allowed_batch_sizes must match max_batch_size")
        if self.target_p99_ms is not None and self.target_p99_ms <= 0:
            raise ConfigError(f"batching: target_p99_ms must be > 0, got {self.target_p99_ms}")


_BATCHING_KEYS = {f for f in BatchingParameters.__dataclass_fields__}


def batching_from_toml(table: Mapping[str, Any], where: str) -> BatchingParameters:
    """``[batching]`` of inferd.toml -> BatchingParameters.

    Raises:
        ConfigError: an unknown key or a value of the wrong type, naming it.
    """
    unknown = sorted(set(table) - _BATCHING_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(_BATCHING_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "pad_variable_length_inputs":
            ok = isinstance(value, bool)
        elif key == "allowed_batch_sizes":
            ok = isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            )
            value = tuple(value) if ok else value
        elif key == "target_p99_ms":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{where}: {key} has the wrong type: {value!r}")
        values[key] = value
    try:
        return BatchingParameters(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message.removeprefix('batching: ')}") from exc


_Message = TypeVar("_Message", bound=Message)


def _read_text_proto(path: Path, message: _Message, what: str) -> _Message:
    """Parse the text-format protobuf file at ``path`` into ``message``.

    Raises:
        ConfigError: the file cannot be read, or does not parse (with line and column).
    """
    try:
        text_format.Parse(path.read_text(), message)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from exc
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return message


def read_batching_parameters_file(path: Path) -> BatchingParameters:
    """Parse TF Serving's text-format ``BatchingParameters`` file (``max_batch_size { value: 128 }``).

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is out of range.
    """
    message = _read_text_proto(path, bp.BatchingParameters(), "batching parameters file")
    values: dict[str, Any] = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        if message.HasField(name):
            values[name] = getattr(message, name).value
    values["allowed_batch_sizes"] = tuple(message.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = message.pad_variable_length_inputs
    return BatchingParameters(**values)


def read_monitoring_config_file(path: Path) -> str | None:
    """Parse TF Serving's ``MonitoringConfig``; the Prometheus path when enabled, else None.

    Raises:
        ConfigError: the file cannot be read or parsed.
    """
    config = _read_text_proto(path, bp.MonitoringConfig(), "monitoring config file").prometheus_config
    if not config.enable:
        return None
    return config.path or "/monitoring/prometheus/metrics"


@dataclass(frozen=True, slots=True)
class FeatureSettings:
    """A model's ``[features]`` table: which features to look up per request and how they join.

    Attributes:
        store: ``redis://host:port/db`` or a Parquet/CSV file (relative to the model's folder).
        entity: request inputs whose values, joined with ``:``, name the entity (strings).
        prefix: Redis keys are ``<prefix>:<entity>``; default: the entity input names.
        fetch: feature names looked up, in order.
        dtypes: feature name -> dtype its stored value is read as; default float64.
        defaults: feature name -> value used when the entity or the feature is missing;
            a feature without one is required (missing: NOT_FOUND).
        inputs: model input -> the columns (request inputs and fetched features), in order, that
            form it; model inputs not named here come from the request as they are.
        lookup_timeout_ms: longest wait for the store per request.
        on_store_error: ``fail`` (UNAVAILABLE naming the store) or ``defaults``.
        cache_ttl_s: how long a looked-up entity is reused; 0 turns the cache off.
        cache_size: most entities cached (the oldest go first).
        cache_bytes: most bytes the cached entities take, keys and values (the oldest go first).
    """

    store: str
    entity: tuple[str, ...]
    fetch: tuple[str, ...]
    inputs: Mapping[str, tuple[str, ...]]
    prefix: str = ""
    dtypes: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, float] = field(default_factory=dict)
    lookup_timeout_ms: float = 50.0
    on_store_error: str = "fail"
    cache_ttl_s: float = 5.0
    cache_size: int = 100_000
    cache_bytes: int = 64 * 1024 * 1024

    @property
    def key_prefix(self) -> str:
        return self.prefix or ":".join(self.entity)


def _check_redis_url(url: str, where: str) -> None:
    """Raise ConfigError for a Redis URL whose port or database is not a number (redis-py fails
    later on the port, with no key named, and takes a database it cannot read as 0)."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  # parsed on access: a port that is not a number raises
    except ValueError:
        raise ConfigError(f"{where}: store {url!r}: the port must be a number") from None
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        raise ConfigError(f"{where}: store {url!r}: the database must be a number, as in redis://host:6379/0")


def features_from_toml(table: Mapping[str, Any], base_path: Path, where: str) -> FeatureSettings:
    """``[features]`` of inferd.toml -> FeatureSettings; a relative store file is resolved
    against ``base_path``.

    Raises:
        ConfigError: a missing, unknown or ill-typed key, or keys that contradict each other.
    """
    known = set(FeatureSettings.__dataclass_fields__)
    if unknown := sorted(set(table) - known):
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    if missing := [k for k in ("store", "entity", "fetch", "inputs") if k not in table]:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    store = _typed(table, "store", str, where)
    if "://" in store:
        if not store.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"{where}: store {store!r} must be redis://, rediss:// or unix:// or a file")
        _check_redis_url(store, where)
    elif not store.endswith((".parquet", ".csv")):
        raise ConfigError(f"{where}: store {store!r} must be a .parquet or .csv file or a Redis URL")
    elif not Path(store).is_absolute():
        store = str(base_path / store)
    entity = table["entity"]
    entity = [entity] if isinstance(entity, str) else entity
    fetch = table["fetch"]
    if not _strings(entity) or not _strings(fetch):
        raise ConfigError(f"{where}: 'entity' and 'fetch' must be non-empty lists of names")
    inputs = _table(table["inputs"], f"{where}.inputs")
    if not inputs or not all(_strings(v) for v in inputs.values()):
        raise ConfigError(f"{where}.inputs: each model input must name a non-empty list of columns")
    dtypes = dict(_table(table.get("dtypes", {}), f"{where}.dtypes"))
    defaults = dict(_table(table.get("defaults", {}), f"{where}.defaults"))
    for name, mapping in (("dtypes", dtypes), ("defaults", defaults)):
        if stray := sorted(set(mapping) - set(fetch)):
            raise ConfigError(f"{where}.{name}: {stray} are not in 'fetch'")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in defaults.values()):
        raise ConfigError(f"{where}.defaults: values must be numbers, got {defaults}")
    used = {column for columns in inputs.values() for column in columns}
    if unused := [name for name in fetch if name not in used]:
        raise ConfigError(f"{where}: fetched feature(s) {unused} are in no model input")
    on_error = table.get("on_store_error", "fail")
    if on_error not in ("fail", "defaults"):
        raise ConfigError(f"{where}: on_store_error must be 'fail' or 'defaults', got {on_error!r}")
    if on_error == "defaults" and (lacking := [n for n in fetch if n not in defaults]):
        raise ConfigError(f"{where}: on_store_error = 'defaults' needs a default for {lacking}")
    settings = FeatureSettings(
        store=store,
        entity=tuple(entity),
        fetch=tuple(fetch),
        inputs={name: tuple(columns) for name, columns in inputs.items()},
        prefix=_typed(table, "prefix", str, where, ""),
        dtypes=dtypes,
        defaults=defaults,
        lookup_timeout_ms=_typed(table, "lookup_timeout_ms", float, where, 50.0),
        on_store_error=on_error,
        cache_ttl_s=_typed(table, "cache_ttl_s", float, where, 5.0),
        cache_size=_typed(table, "cache_size", int, where, 100_000),
        cache_bytes=_typed(table, "cache_bytes", int, where, 64 * 1024 * 1024),
    )
    if settings.lookup_timeout_ms <= 0 or settings.cache_ttl_s < 0 or settings.cache_size < 1:
        raise ConfigError(f"{where}: lookup_timeout_ms must be > 0, cache_ttl_s >= 0, cache_size >= 1")
    if settings.cache_bytes < 0:
        raise ConfigError(f"{where}: 'cache_bytes' must be >= 0, got {settings.cache_bytes}")
    return settings


_T = TypeVar("_T", str, int, float)


def _typed(table: Mapping[str, Any], key: str, kind: type[_T], where: str, default: _T | None = None) -> _T:
    """``table[key]`` as ``kind`` (an int is accepted as a float), or ``default`` when absent."""
    value = table.get(key, default)
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ConfigError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}")
    return kind(value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


SHADOW_COMPARISONS = ("auto", "argmax", "tolerance", "exact")


@dataclass(frozen=True, slots=True)
class ShadowSettings:
    """A model's ``[shadow]`` table: mirror a sample of its requests to another version.

    Attributes:
        version: the version requests are mirrored to (it must be served: policy or label).
        fraction: the share of answered requests mirrored, in [0, 1].
        compare: ``auto`` (an output of two or more columns by argmax, as a classifier's scores;
            other float outputs within ``tolerance``; the rest exactly), or one of ``argmax``,
            ``tolerance``, ``exact`` for every output.
        tolerance: the absolute difference under which two float values agree.
        queue: mirrored requests waiting at most; more are dropped (and counted).
    """

    version: int
    fraction: float = 0.1
    compare: str = "auto"
    tolerance: float = 1e-6
    queue: int = 64


def shadow_from_toml(table: Mapping[str, Any], where: str) -> ShadowSettings:
    """``[shadow]`` of inferd.toml -> ShadowSettings.

    Raises:
        ConfigError: an unknown key or a bad value, naming the key and what was expected.
    """
    unknown = sorted(set(table) - {"version", "fraction", "compare", "tolerance", "queue"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; expected version, fraction, compare, tolerance, queue"
        )
    version = table.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigError(f"{where}: 'version' must be a version number, got {version!r}")
    fraction = table.get("fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
        raise ConfigError(f"{where}: 'fraction' must be a number in [0, 1], got {fraction!r}")
    compare = table.get("compare", "auto")
    if compare not in SHADOW_COMPARISONS:
        raise ConfigError(f"{where}: 'compare' must be one of {list(SHADOW_COMPARISONS)}, got {compare!r}")
    tolerance = table.get("tolerance", 1e-6)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance >= 0:
        raise ConfigError(f"{where}: 'tolerance' must be a number >= 0, got {tolerance!r}")
    queue = table.get("queue", 64)
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 1:
        raise ConfigError(f"{where}: 'queue' must be an integer >= 1, got {queue!r}")
    return ShadowSettings(version, float(fraction), compare, float(tolerance), queue)


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """A model's ``[capture]`` table: write a sample of requests and answers to Parquet files.

    Attributes:
        path: the folder the files go to (a relative path is under the model's base path).
        fraction: the share of answered requests captured, in [0, 1].
        fields: the columns kept (``request_id``, ``time``, ``model``, ``version``,
            ``latency_ms``, input names, ``output.<name>``); empty keeps them all.
        budget_mb: the folder's Parquet files are kept under this many MiB, oldest deleted first.
        file_rows: rows per file; a file is also written once its first row is ``flush_s`` old.
        flush_s: the longest a captured row waits in memory before its file is written.
        queue: captured requests waiting for the writer at most; more are dropped (counted).
    """

    path: Path
    fraction: float = 0.01
    fields: tuple[str, ...] = ()
    budget_mb: float = 1024.0
    file_rows: int = 10_000
    flush_s: float = 10.0
    queue: int = 1024


def capture_from_toml(table: Mapping[str, Any], base_path: Path, where: str) -> CaptureSettings:
    """``[capture]`` of inferd.toml -> CaptureSettings.

    Raises:
        ConfigError: an unknown key or a bad value, naming the key and what was expected.
    """
    known = {"path", "fraction", "fields", "budget_mb", "file_rows", "flush_s", "queue"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    path = table.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: 'path' must be a folder path, got {path!r}")
    fields = table.get("fields", [])
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise ConfigError(f"{where}: 'fields' must be a list of column names, got {fields!r}")
    numbers: dict[str, float] = {}
    for key, default, low in (("fraction", 0.01, 0.0), ("budget_mb", 1024.0, 0.0), ("flush_s", 10.0, 0.0)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value < math.inf:
            raise ConfigError(f"{where}: {key!r} must be a finite number >= {low:g}, got {value!r}")
        numbers[key] = float(value)
    if numbers["fraction"] > 1:
        raise ConfigError(f"{where}: 'fraction' must be a number in [0, 1], got {numbers['fraction']!r}")
    counts: dict[str, int] = {}
    for key, default_count in (("file_rows", 10_000), ("queue", 1024)):
        count = table.get(key, default_count)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{where}: {key!r} must be an integer >= 1, got {count!r}")
        counts[key] = count
    return CaptureSettings(
        base_path / path,
        numbers["fraction"],
        tuple(fields),
        numbers["budget_mb"],
        counts["file_rows"],
        numbers["flush_s"],
        counts["queue"],
    )


@dataclass(frozen=True, slots=True)
class ResidencySettings:
    """A model's ``[residency]`` table: how it lives under a memory budget.

    Attributes:
        pin: loaded at start and never unloaded to make room or for idling.
        idle_unload_s: unloaded after this many seconds without a request (budget or not), and
            loaded again by the next one; 0 (default) never.
    """

    pin: bool = False
    idle_unload_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """A model's ``inferd.toml``: which runtime, its options, and serving defaults.

    Attributes:
        runtime: runtime name (``onnx``, ``sklearn``, ``python``); None detects it from files.
        runtime_tables: each runtime's table by runtime name, e.g. ``[onnx]``; the runtime a
            version loads with reads its own (``options``) and checks its keys. Versions of one
            model may use different runtimes, each configured by its table.
        version_policy: used when the model config file gives none.
        labels: used when the model config file gives none.
        shadow: the ``[shadow]`` table: a version that a sample of requests is mirrored to.
        capture: the ``[capture]`` table: a sample of requests and answers written to Parquet.
        traffic: the ``[traffic]`` table: label or version number -> weight, splitting the
            requests that name neither a version nor a label (see ``traffic.py``).
        signature: declared signature (``[signature]`` table), for models that cannot tell.
        warmup: call each signature once with zeros before serving a version (default true).
        batching: the ``[batching]`` table; None leaves batching to the server-wide setting.
        features: the ``[features]`` table; None when requests carry every input.
        prediction_cache_size: answers kept per version, keyed by the exact inputs; 0 is off.
        prediction_cache_bytes: most bytes that cache holds per version, inputs and answers.
        device: where the model computes: ``cpu`` (default) or ``cuda:N`` (``cuda`` is
            ``cuda:0``), for runtimes that can use a GPU.
        isolation: ``none`` (default: the model runs in the server's process) or ``process``
            (in a worker process of its own, whose crash does not take the server down).
        safe: set by the server's ``--safe`` flag, never by inferd.toml: refuse formats whose
            loading runs code from the repository.
        residency: the ``[residency]`` table (pinning, unloading when idle).
        prefer_tflite: set by ``--prefer_tflite_model``: a version folder holding ``model.tflite``
            is served by the TFLite runtime even when it also holds a SavedModel.
        cache_dir: set by ``--model_cache_dir`` ("": the default folder); runtimes keep files
            they derive from versions under it (``model_cache.derived_dir``).
    """

    runtime: str | None = None
    runtime_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    version_policy: VersionPolicy | None = None
    labels: Mapping[str, int] = field(default_factory=dict)
    traffic: Mapping[str, float] = field(default_factory=dict)
    shadow: ShadowSettings | None = None
    capture: CaptureSettings | None = None
    signature: Mapping[str, Any] = field(default_factory=dict)
    warmup: bool = True
    batching: BatchingParameters | None = None
    features: FeatureSettings | None = None
    prediction_cache_size: int = 0
    prediction_cache_bytes: int = 64 * 1024 * 1024
    device: str = "cpu"
    isolation: str = "none"
    safe: bool = False
    residency: ResidencySettings = field(default_factory=ResidencySettings)
    prefer_tflite: bool = False
    cache_dir: str = ""

    def options(self, runtime: str) -> Mapping[str, Any]:
        """The ``[runtime]`` table's options; empty when the table is absent."""
        return self.runtime_tables.get(runtime, {})


ISOLATION_MODES = ("none", "process")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One served model: where its versions live and how to choose among them.

    ``version_policy`` None and empty ``labels`` defer to the model's ``inferd.toml``, then to
    the default policy (latest 1) and no labels. ``platform`` names the runtime and overrides
    ``inferd.toml`` and detection.
    """

    name: str
    base_path: Path | str  # a folder, or an object-store URI (see ``model_location``)
    platform: str | None = None
    version_policy: VersionPolicy | None = None
    labels: Mapping[str, int] = field(default_factory=dict)


def option(help: str, least: float | None = None, most: float = math.inf, **field_options: Any) -> Any:
    """A ``ServerConfig`` field: ``field(**field_options)`` carrying its one-line description and,
    for a number, the range ``ServerConfig`` holds it to (``least`` to ``most``)."""
    return field(metadata={"help": help, "range": (least, most)}, **field_options)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``inferd serve`` was told. Field names follow TF Serving's flags.

    Each option is declared once, here: its type, default and one-line description, from which
    ``inferd serve`` makes its flag ``--NAME``, its environment variable ``INFERD_NAME`` and its
    help (``repository`` is the positional DIR).

    Exactly one model source is used: ``model_config_file``, ``repository`` (each sub-folder a
    model), or ``model_name`` with ``model_base_path``.
    """

    host: str = option(
        "address to listen on; 0.0.0.0 (every interface) as in TF Serving, 127.0.0.1 for this machine only",
        default="0.0.0.0",
    )
    rest_api_port: int = option("port of the REST API", default=8501, least=0, most=65535)
    workers: str = option(
        "server processes sharing the REST and gRPC ports, each serving every model; auto: one per "
        "core (1: one process, no supervisor)",
        default="1",
    )
    port: int = option(
        "port of the gRPC API (TF Serving's and the V2 services); 0 turns gRPC off",
        default=8500,
        least=0,
        most=65535,
    )
    model_name: str = option("name of the model served from --model_base_path", default="default")
    model_base_path: str = option(
        "folder or object-store URI (s3://, gs://, az://) holding the model's numbered version folders",
        default="",
    )
    model_config_file: str = option(
        "TF Serving text-format ModelServerConfig (model_config_list) naming every model",
        default="",
    )
    repository: str = option("model repository: one sub-folder per model", default="")
    model_config_file_poll_wait_seconds: float = option(
        "re-read --model_config_file this often and apply it (0: read once at start)",
        default=0.0,
    )
    file_system_poll_wait_seconds: float = option(
        "scan the model folders for new and removed versions this often (0: once at start)",
        default=1.0,
    )
    model_cache_dir: str = option(
        "local folder caching versions downloaded from object stores, and in derived/ the mapped "
        "copies [onnx] share_weights writes (default ~/.cache/inferd/models)",
        default="",
    )
    model_cache_bytes: int = option(
        "most bytes the model cache holds; least recently used versions not served are evicted (0: no bound)",
        default=10 * 1024**3,
        least=0,
    )
    rest_api_timeout_in_ms: int = option(
        "deadline of one REST request; past it the answer is 504",
        default=30_000,
        least=1,
    )
    rest_api_num_threads: int = option(
        "threads that run unbatched model calls slower than 50 us (batching queues have their own threads)",
        default_factory=lambda: os.cpu_count() or 1,
        least=1,
    )
    decode_processes: int = option(
        "processes that decode large REST JSON bodies (1 MiB and up), started at the first one, "
        "so that decoding them does not hold the server's GIL (0: decode them on a thread)",
        default=1,
        least=0,
    )
    max_request_bytes: int = option(
        "largest request body accepted; larger bodies get 413",
        default=64 * 1024 * 1024,
        least=1,
    )
    max_header_bytes: int = option(
        "largest total size of a request's HTTP headers or gRPC metadata; more get 413",
        default=64 * 1024,
        least=1,
    )
    max_connections: int = option(
        "open connections per port (REST and gRPC each) past which new ones are refused at once "
        "(REST: 503 and close); 0: a quarter of the open-file limit, at most 10,000",
        default=0,
    )
    header_timeout_s: float = option(
        "seconds a client may take to send a request's line and headers (on the gRPC port: to "
        "finish its TLS handshake and acknowledge the HTTP/2 settings); past it 408 and close",
        default=60.0,
    )
    body_timeout_s: float = option(
        "seconds a request body may go without a byte arriving (past it 408 and close), and an "
        "answer without the client reading (past it the connection closes)",
        default=60.0,
    )
    keep_alive_timeout_s: float = option("seconds an idle keep-alive REST connection stays open", default=5.0)
    max_inflight_bytes: int = option(
        "bytes of request bodies (REST) and messages (gRPC) held at once, server-wide; a request "
        "past it gets 503 / UNAVAILABLE at once; at least --max_request_bytes",
        default=1024 * 1024 * 1024,
    )
    max_tensor_elements: int = option(
        "most elements in one input tensor (and largest dim of a declared shape); more get 413, "
        "refused before allocation",
        default=64 * 1024 * 1024,
    )
    max_json_depth: int = option(
        "deepest nesting of JSON lists in one tensor's value; deeper gets 400",
        default=32,
    )
    max_string_bytes: int = option(
        "longest string element (BYTES / DT_STRING) in bytes; longer gets 413",
        default=8 * 1024 * 1024,
    )
    max_instances: int = option(
        "most rows in TF Serving 'instances' or examples in classify/regress; more get 413",
        default=100_000,
    )
    num_load_threads: int = option(
        "threads that load model versions: this many models load at once (one model's versions "
        "load one at a time); a slow load delays no other model while threads are free",
        default=4,
        least=1,
    )
    enable_batching: bool = option(
        "merge concurrent requests for one model version into one predict call (every model)",
        default=False,
    )
    batching_parameters_file: str = option(
        "TF Serving text-format BatchingParameters (max_batch_size { value: 32 } ...); needs "
        "--enable_batching",
        default="",
    )
    monitoring_config_file: str = option(
        "TF Serving MonitoringConfig; prometheus_config { enable: true } also serves metrics at its path",
        default="",
    )
    enable_metrics: bool = option("serve Prometheus metrics at /metrics", default=True)
    dashboard: bool = option("serve the dashboard page at / and its data under /dashboard/api/", default=True)
    otel_endpoint: str = option(
        "export OpenTelemetry traces to this OTLP receiver (OTEL_EXPORTER_OTLP_PROTOCOL: grpc or "
        "http/protobuf); needs inferd[otel]",
        default="",
    )
    otel_sample_rate: float = option(
        "share of requests traced, 0 to 1, when the client sent no traceparent", default=1.0, least=0, most=1
    )
    max_in_flight: int = option(
        "per model version, unbatched predictions running or waiting beyond which requests get 503",
        default=256,
        least=1,
    )
    drain_timeout_s: float = option(
        "on SIGTERM/SIGINT, how long requests in flight may take to finish before the server exits "
        "(new ones get 503 meanwhile)",
        default=30.0,
        least=0,
    )
    admin_token: str = option(
        "bearer token for admin calls (V2 repository load/unload/index, HandleReloadConfigRequest); "
        "unset: admin calls are refused",
        default="",
        repr=False,
    )
    api_token: str = option(
        "bearer token every other call must carry; unset: prediction and status are open",
        default="",
        repr=False,
    )
    safe: bool = option(
        "refuse models whose loading runs code from the repository: custom model.py, pickle/joblib, "
        "TensorFlow and torch programs (ONNX, TFLite, skops, XGBoost and LightGBM still load)",
        default=False,
    )
    ssl_config_file: str = option(
        "TF Serving text-format SSLConfig (server_key, server_cert and custom_ca as PEM text, "
        "client_verify): TLS on both ports",
        default="",
    )
    tls_cert: str = option("PEM certificate (chain) file: TLS on both ports; needs --tls_key", default="")
    tls_key: str = option("PEM private key file of --tls_cert (unencrypted)", default="")
    tls_ca: str = option(
        "PEM file of the CA that client certificates must chain to (with --tls_client_verify)",
        default="",
    )
    tls_client_verify: bool = option(
        "mutual TLS: refuse clients without a certificate signed by --tls_ca",
        default=False,
    )
    memory_budget: str = option(
        "bound the memory of loaded models: SIZE (e.g. 8GiB) for host memory, cuda:N=SIZE for a "
        "GPU; repeatable (or comma-separated). Models then load on their first request and idle "
        "ones are unloaded to make room; unset: every model loads at start",
        default="",
    )
    load_wait_ms: int = option(
        "with --memory_budget, how long a request waits for its model's cold load before it gets "
        "503 with Retry-After (the load goes on)",
        default=5000,
        least=0,
    )
    traffic_key_header: str = option(
        "request header (gRPC metadata key) whose value keeps a client on one version of a [traffic] split",
        default="",
    )
    rollout_state_dir: str = option(
        "folder where canary rollouts keep their state, so that a restarted server resumes or rolls "
        "them back; unset: rollouts end with the process",
        default="",
    )
    grpc_socket_path: str = option(
        "also serve the gRPC API on this Unix socket (relative or absolute path)", default=""
    )
    grpc_channel_arguments: str = option(
        "comma-separated gRPC server arguments, e.g. grpc.max_connection_age_ms=2000", default=""
    )
    rest_api_enable_cors_support: bool = option(
        "answer CORS preflight (OPTIONS) requests and add Access-Control-Allow-* headers to answers",
        default=False,
    )
    enable_model_warmup: bool = option(
        "warm each version up before serving it: replay assets.extra/tf_serving_warmup_requests "
        "where a SavedModel has one, else one call with zeros per signature",
        default=True,
    )
    num_request_iterations_for_warmup: int = option(
        "times each warm-up request is replayed (0: once)", default=0
    )
    saved_model_tags: str = option(
        "comma-separated tags of the SavedModel MetaGraphDef to load", default="serve"
    )
    tensorflow_session_parallelism: int = option(
        "threads of a TensorFlow session, for both of the next two flags where they are 0 (0: auto)",
        default=0,
    )
    tensorflow_intra_op_parallelism: int = option(
        "threads inside one TensorFlow op (also onnxruntime's intra_op_num_threads; 0: auto)", default=0
    )
    tensorflow_inter_op_parallelism: int = option(
        "TensorFlow ops run at once (also onnxruntime's inter_op_num_threads; 0: auto)", default=0
    )
    prefer_tflite_model: bool = option(
        "serve a SavedModel folder's model.tflite with TFLite instead", default=False
    )
    enable_serialization_as_tensor_content: bool = option(
        "gRPC Predict answers carry tensor_content bytes instead of the typed value fields", default=False
    )
    enable_profiler: bool = option(
        "serve TensorFlow's profiler service (tensorflow.ProfilerService) on the gRPC port, for "
        "tf.profiler.experimental.client.trace and TensorBoard; needs TensorFlow installed",
        default=True,
    )

    def __post_init__(self) -> None:
        """Raises ConfigError for a number that is NaN or outside its option's range, or one
        port for both gRPC and REST."""
        for spec in fields(self):
            value, (least, most) = getattr(self, spec.name), spec.metadata["range"]
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"--{spec.name} must be a number, got nan")
            if least is not None and not least <= value <= most:
                within = f">= {least:g}" if most == math.inf else f"from {least:g} to {most:g}"
                raise ConfigError(f"--{spec.name} must be {within}, got {value}")
        if self.port and self.port == self.rest_api_port:  # as TF Serving refuses it
            raise ConfigError(
                f"--port and --rest_api_port are both {self.port}: gRPC and REST need a port each"
            )


INERT_TFSERVING_FLAGS: dict[str, tuple[type, str]] = {
    "allow_version_labels_for_unavailable_models": (
        bool,
        "labels are given in the model config file and follow the versions as they load",
    ),
    "enable_per_model_batching_parameters": (
        bool,
        "per-model batching is always on: a model's inferd.toml [batching] table wins over the server's",
    ),
    "num_unload_threads": (int, "versions are closed on the load thread pool once their last request ends"),
    "max_num_load_retries": (int, "a version that fails to load is retried when its folder changes"),
    "load_retry_interval_micros": (int, "a version that fails to load is retried when its folder changes"),
    "flush_filesystem_caches": (bool, "inferd keeps no file system caches of its own"),
    "tensorflow_session_config_file": (
        str,
        "a ConfigProto file is not read; use --tensorflow_intra_op_parallelism and "
        "--tensorflow_inter_op_parallelism",
    ),
    "use_alts_credentials": (bool, "Google ALTS is not supported; use --ssl_config_file for TLS"),
    "platform_config_file": (str, "runtimes are chosen by model_platform, inferd.toml or the model's files"),
    "per_process_gpu_memory_fraction": (float, "TensorFlow grows its GPU memory as models need it"),
    "grpc_max_threads": (int, "the gRPC server runs on the event loop, not on a thread pool"),
    "remove_unused_fields_from_bundle_metagraph": (bool, "inferd keeps no MetaGraphDef after loading"),
    "num_tflite_pools": (int, "one LiteRT interpreter serves each TFLite version"),
    "num_tflite_interpreters_per_pool": (int, "one LiteRT interpreter serves each TFLite version"),
    "enable_signature_method_name_check": (
        bool,
        "Classify and Regress take a predict signature whose outputs have TF Serving's names (its "
        "default) and refuse other methods",
    ),
    "xla_cpu_compilation_enabled": (bool, "XLA JIT compilation is left as TensorFlow sets it"),
    "xla_gpu_compilation_enabled": (bool, "XLA JIT compilation is left as TensorFlow sets it"),
    "thread_pool_factory_config_file": (str, "inferd runs predictions on its own thread pool"),
    "mixed_precision": (str, "models run in the precision they were saved in"),
    "skip_initialize_tpu": (bool, "inferd does not run on TPUs"),
    "enable_grpc_healthcheck_service": (bool, "the standard gRPC health service is always served"),
}
"""TF Serving flags (``tensorflow_model_server --help``) that mean nothing for inferd: accepted,
with their type, and logged once with the reason."""


def worker_count(text: str) -> int:
    """``--workers``: a whole number of processes, at least 1, or ``auto`` for one per core this
    process may run on.

    Raises:
        ConfigError: anything else.
    """
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(
            f"--workers: expected a whole number of processes (1 or more) or auto, got {text!r}"
        )
    return count


def channel_arguments(text: str) -> list[tuple[str, str | int]]:
    """Parse ``--grpc_channel_arguments`` (``grpc.max_connection_age_ms=2000,grpc.x=y``) into gRPC
    server options; values that are 32-bit integers become ints, as TF Serving passes them, and
    every other value a string (gRPC core's integer options are C ints: a larger int made the
    server fail to start with an OverflowError).

    Raises:
        ConfigError: an entry without ``=``.
    """
    options: list[tuple[str, str | int]] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--grpc_channel_arguments: expected key=value, got {entry!r}")
        options.append((key.strip(), _channel_value(value.strip())))
    return options


def _channel_value(value: str) -> str | int:
    """``value`` as an int when it is a 32-bit integer, else as it is."""
    try:
        number = int(value)
    except ValueError:
        return value
    return number if -(2**31) <= number < 2**31 else value


def with_server_flags(settings: ModelSettings, config: ServerConfig) -> ModelSettings:
    """``settings`` with the server's runtime flags filled in where the model's inferd.toml is
    silent: TensorFlow's tags and thread counts (also onnxruntime's thread counts), the warm-up
    switch, ``--prefer_tflite_model`` and ``--model_cache_dir``."""
    tables = {name: dict(table) for name, table in settings.runtime_tables.items()}
    intra = config.tensorflow_intra_op_parallelism or config.tensorflow_session_parallelism
    inter = config.tensorflow_inter_op_parallelism or config.tensorflow_session_parallelism
    tensorflow = tables.setdefault("tensorflow", {})
    tensorflow.setdefault("tags", config.saved_model_tags)
    if intra:
        tensorflow.setdefault("intra_op_parallelism", intra)
        tables.setdefault("onnx", {}).setdefault("intra_op_num_threads", intra)
    if inter:
        tensorflow.setdefault("inter_op_parallelism", inter)
        tables.setdefault("onnx", {}).setdefault("inter_op_num_threads", inter)
    if config.enable_model_warmup:
        tensorflow.setdefault("warmup_iterations", max(config.num_request_iterations_for_warmup, 1))
    else:
        tensorflow.setdefault("warmup_iterations", 0)
    return replace(
        settings,
        runtime_tables=tables,
        warmup=settings.warmup and config.enable_model_warmup,
        prefer_tflite=config.prefer_tflite_model,
        cache_dir=config.model_cache_dir,
    )


_RUNTIME_TABLES = ("onnx", "sklearn", "python", "tensorflow", "tflite", "torch", "xgboost", "lightgbm")
_KNOWN_KEYS = {
    "runtime",
    "version_policy",
    "labels",
    "traffic",
    "shadow",
    "capture",
    "signature",
    "warmup",
    "batching",
    "features",
    "prediction_cache_size",
    "prediction_cache_bytes",
    "device",
    "isolation",
    "residency",
    "ray",  # inferd ray serve's scaling (inferd.ray.deployment.scaling_file), not the model's
    *_RUNTIME_TABLES,
}
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def read_model_settings(base_path: Path) -> ModelSettings:
    """Read ``<base_path>/inferd.toml``; defaults when the file is absent.

    Raises:
        ConfigError: the file is not valid TOML or holds an unknown key or a bad value.
    """
    path = base_path / SETTINGS_FILE
    try:
        raw = tomllib.loads(_read_regular_file(path))
    except FileNotFoundError:
        return ModelSettings()
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(_KNOWN_KEYS)}")
    runtime = raw.get("runtime")
    if runtime is not None and not isinstance(runtime, str):
        raise ConfigError(f"{path}: 'runtime' must be a string, got {runtime!r}")
    policy = raw.get("version_policy")
    warmup = raw.get("warmup", True)
    if not isinstance(warmup, bool):
        raise ConfigError(f"{path}: 'warmup' must be true or false, got {warmup!r}")
    device = raw.get("device", "cpu")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ConfigError(f'{path}: \'device\' must be "cpu" or "cuda:N", got {device!r}')
    isolation = raw.get("isolation", "none")
    if isolation not in ISOLATION_MODES:
        raise ConfigError(f"{path}: 'isolation' must be one of {list(ISOLATION_MODES)}, got {isolation!r}")
    return ModelSettings(
        runtime=runtime,
        runtime_tables={
            name: _table(raw[name], f"{path}: [{name}]") for name in _RUNTIME_TABLES if name in raw
        },
        version_policy=None if policy is None else _policy_from_toml(policy, path),
        labels=_labels(raw.get("labels", {}), f"{path}: [labels]"),
        shadow=shadow_from_toml(_table(raw["shadow"], f"{path}: [shadow]"), f"{path}: [shadow]")
        if "shadow" in raw
        else None,
        capture=capture_from_toml(
            _table(raw["capture"], f"{path}: [capture]"), base_path, f"{path}: [capture]"
        )
        if "capture" in raw
        else None,
        traffic=parse_weights(_table(raw.get("traffic", {}), f"{path}: [traffic]"), f"{path}: [traffic]"),
        signature=_table(raw.get("signature", {}), f"{path}: [signature]"),
        warmup=warmup,
        batching=(
            batching_from_toml(_table(raw["batching"], f"{path}: [batching]"), f"{path}: [batching]")
            if "batching" in raw
            else None
        ),
        features=(
            features_from_toml(
                _table(raw["features"], f"{path}: [features]"), base_path, f"{path}: [features]"
            )
            if "features" in raw
            else None
        ),
        prediction_cache_size=_prediction_cache_size(raw, path),
        prediction_cache_bytes=_prediction_cache_bytes(raw, path),
        device="cuda:0" if device == "cuda" else device,
        isolation=isolation,
        residency=_residency(raw.get("residency", {}), f"{path}: [residency]"),
    )


def _residency(raw: Any, where: str) -> ResidencySettings:
    table = _table(raw, where)
    unknown = sorted(set(table) - {"pin", "idle_unload_s"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected pin, idle_unload_s")
    pin = table.get("pin", False)
    if not isinstance(pin, bool):
        raise ConfigError(f"{where}: 'pin' must be true or false, got {pin!r}")
    idle = table.get("idle_unload_s", 0)
    if isinstance(idle, bool) or not isinstance(idle, int | float) or idle < 0:
        raise ConfigError(f"{where}: 'idle_unload_s' must be a number of seconds >= 0, got {idle!r}")
    return ResidencySettings(pin, float(idle))


def _read_regular_file(path: Path) -> str:
    """The text of ``path``, refusing anything but a regular file: reading a FIFO would block.

    Raises:
        FileNotFoundError: nothing is there. OSError: it is not a regular file or cannot be read.
    """
    if path.is_symlink() and not path.exists():
        raise OSError(f"{path} is a broken symbolic link")
    if path.exists() and not path.is_file():
        raise OSError(f"{path} is not a regular file")
    return path.read_text()


def _prediction_cache_size(raw: Mapping[str, Any], path: Path) -> int:
    size = _typed(raw, "prediction_cache_size", int, str(path), 0)
    if size < 0:
        raise ConfigError(f"{path}: 'prediction_cache_size' must be >= 0, got {size}")
    return size


def _prediction_cache_bytes(raw: Mapping[str, Any], path: Path) -> int:
    size = _typed(raw, "prediction_cache_bytes", int, str(path), 64 * 1024 * 1024)
    if size < 0:
        raise ConfigError(f"{path}: 'prediction_cache_bytes' must be >= 0, got {size}")
    return size


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {value!r}")
    return value


_LABEL = re.compile(r"[A-Za-z0-9_]+")


def _labels(value: Any, where: str) -> dict[str, int]:
    table = _table(value, where)
    for label, version in table.items():
        if not _LABEL.fullmatch(label):
            raise ConfigError(f"{where}: label {label!r} must match [a-zA-Z0-9_]+")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"{where}: label {label!r} must name an integer version")
    return dict(table)


def _policy_from_toml(value: Any, path: Path) -> VersionPolicy:
    where = f"{path}: version_policy"
    table = _table(value, where)
    if len(table) != 1:
        raise ConfigError(f"{where} takes one of latest = N, all = true, specific = [..]")
    ((kind, arg),) = table.items()
    if kind == "latest" and isinstance(arg, int) and not isinstance(arg, bool) and arg >= 1:
        return VersionPolicy("latest", num_versions=arg)
    if kind == "all" and arg is True:
        return VersionPolicy("all")
    if (
        kind == "specific"
        and isinstance(arg, list)
        and arg
        and all(isinstance(v, int) and not isinstance(v, bool) for v in arg)
    ):
        return VersionPolicy("specific", versions=tuple(sorted(arg)))
    raise ConfigError(f"{where}: {kind} = {arg!r} is not one of latest = N>=1, all = true, specific = [ints]")


def parse_model_config(text: str, source: str = "model config") -> list[ModelConfig]:
    """Parse TF Serving's text-format ``ModelServerConfig`` (``model_config_list { ... }``).

    Relative base paths are kept as written; the caller resolves them.

    Raises:
        ConfigError: the text does not parse, or see ``models_from_proto``.
    """
    message = pb.ModelServerConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        # TF Serving's wording, which its tests and users' scripts look for.
        raise ConfigError(
            f"{source}: Error parsing text-format tensorflow.serving.ModelServerConfig: {exc}"
        ) from exc
    return models_from_proto(message, source)


def models_from_proto(message: pb.ModelServerConfig, source: str) -> list[ModelConfig]:
    """The models of a ``ModelServerConfig``, from a file or a HandleReloadConfigRequest.

    Raises:
        ConfigError: a custom_model_config, a model without a name or base path, a name given
            twice, or a bad label.
    """
    if message.WhichOneof("config") == "custom_model_config":
        raise ConfigError(f"{source}: custom_model_config is not supported; use model_config_list")
    models: list[ModelConfig] = []
    for entry in message.model_config_list.config:
        if not entry.name:
            raise ConfigError(f"{source}: a config entry has no name")
        if not entry.base_path:
            raise ConfigError(f"{source}: model {entry.name!r} has no base_path")
        if any(m.name == entry.name for m in models):
            raise ConfigError(f"{source}: model {entry.name!r} is configured twice")
        labels = _labels(dict(entry.version_labels), f"{source}: model {entry.name!r} version_labels")
        models.append(
            ModelConfig(
                name=entry.name,
                base_path=model_location(entry.base_path),
                platform=entry.model_platform or None,
                version_policy=_policy_from_proto(entry),
                labels=labels,
            )
        )
    return models


def _policy_from_proto(entry: pb.ModelConfig) -> VersionPolicy | None:
    if not entry.HasField("model_version_policy"):
        return None
    policy = entry.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        return VersionPolicy("specific", versions=tuple(sorted(policy.specific.versions)))
    return VersionPolicy("latest", num_versions=max(policy.latest.num_versions, 1))


def read_model_config_file(path: Path) -> list[ModelConfig]:
    """Read and parse a model config file. Relative base paths are relative to the working
    folder, as in TF Serving."""
    try:
        text = _read_regular_file(path)
    except OSError as exc:
        raise ConfigError(f"cannot read model config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"model config file {path} is not UTF-8 text (byte {exc.start})") from exc
    if not text.strip():
        # Most likely caught between truncation and write; a config with no models is written
        # as "model_config_list {}".
        raise ConfigError(f"model config file {path} is empty")
    return parse_model_config(text, str(path))
