"""Server and model configuration: TF Serving's flags and model config file, and ``inferd.toml``.

Precedence, highest first: command-line flags, ``INFERD_*`` environment variables (applied by
the CLI), the model config file and each model's ``inferd.toml``, then the defaults here.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import text_format
from google.protobuf.message import Message

from inferd._proto import batching_parameters_pb2 as bp
from inferd._proto import model_server_config_pb2 as pb
from inferd.errors import ConfigError

SETTINGS_FILE = "inferd.toml"
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
class ModelSettings:
    """A model's ``inferd.toml``: which runtime, its options, and serving defaults.

    Attributes:
        runtime: runtime name (``onnx``, ``sklearn``, ``python``); None detects it from files.
        runtime_options: the table named after the runtime, e.g. ``[onnx]``; the runtime
            checks its keys when it loads.
        version_policy: used when the model config file gives none.
        labels: used when the model config file gives none.
        signature: declared signature (``[signature]`` table), for models that cannot tell.
        warmup: call each signature once with zeros before serving a version (default true).
        batching: the ``[batching]`` table; None leaves batching to the server-wide setting.
        device: where the model computes: ``cpu`` (default) or ``cuda:N`` (``cuda`` is
            ``cuda:0``), for runtimes that can use a GPU.
    """

    runtime: str | None = None
    runtime_options: Mapping[str, Any] = field(default_factory=dict)
    version_policy: VersionPolicy | None = None
    labels: Mapping[str, int] = field(default_factory=dict)
    signature: Mapping[str, Any] = field(default_factory=dict)
    warmup: bool = True
    batching: BatchingParameters | None = None
    device: str = "cpu"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One served model: where its versions live and how to choose among them.

    ``version_policy`` None and empty ``labels`` defer to the model's ``inferd.toml``, then to
    the default policy (latest 1) and no labels. ``platform`` names the runtime and overrides
    ``inferd.toml`` and detection.
    """

    name: str
    base_path: Path
    platform: str | None = None
    version_policy: VersionPolicy | None = None
    labels: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``inferd serve`` was told. Field names follow TF Serving's flags.

    Exactly one model source is used: ``model_config_file``, ``repository`` (each sub-folder a
    model), or ``model_name`` with ``model_base_path``.
    """

    host: str = "0.0.0.0"
    rest_api_port: int = 8501
    port: int = 8500
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    repository: str = ""
    model_config_file_poll_wait_seconds: float = 0.0
    file_system_poll_wait_seconds: float = 1.0
    rest_api_timeout_in_ms: int = 30_000
    rest_api_num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_request_bytes: int = 64 * 1024 * 1024
    load_threads: int = 2
    enable_batching: bool = False
    batching_parameters_file: str = ""
    monitoring_config_file: str = ""
    enable_metrics: bool = True
    max_in_flight: int = 256
    admin_token: str = field(default="", repr=False)
    api_token: str = field(default="", repr=False)


_RUNTIME_TABLES = ("onnx", "sklearn", "python", "tensorflow", "tflite", "torch", "xgboost", "lightgbm")
_KNOWN_KEYS = {
    "runtime",
    "version_policy",
    "labels",
    "signature",
    "warmup",
    "batching",
    "device",
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
        raw = tomllib.loads(path.read_text())
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
    options = raw.get(runtime or "", {}) if runtime else _only_table(raw, path)
    policy = raw.get("version_policy")
    warmup = raw.get("warmup", True)
    if not isinstance(warmup, bool):
        raise ConfigError(f"{path}: 'warmup' must be true or false, got {warmup!r}")
    device = raw.get("device", "cpu")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ConfigError(f'{path}: \'device\' must be "cpu" or "cuda:N", got {device!r}')
    return ModelSettings(
        runtime=runtime,
        runtime_options=_table(options, f"{path}: [{runtime}]"),
        version_policy=None if policy is None else _policy_from_toml(policy, path),
        labels=_labels(raw.get("labels", {}), f"{path}: [labels]"),
        signature=_table(raw.get("signature", {}), f"{path}: [signature]"),
        warmup=warmup,
        batching=(
            batching_from_toml(_table(raw["batching"], f"{path}: [batching]"), f"{path}: [batching]")
            if "batching" in raw
            else None
        ),
        device="cuda:0" if device == "cuda" else device,
    )


def _only_table(raw: Mapping[str, Any], path: Path) -> Mapping[str, Any]:
    """With no ``runtime`` key, a single runtime table (e.g. ``[onnx]``) gives the options."""
    tables = [name for name in _RUNTIME_TABLES if name in raw]
    if len(tables) > 1:
        raise ConfigError(f"{path}: several runtime tables {tables}; set 'runtime' to choose one")
    return raw[tables[0]] if tables else {}


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
        raise ConfigError(f"{source}: {exc}") from exc
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
                base_path=Path(entry.base_path),
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
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read model config file {path}: {exc.strerror}") from exc
    if not text.strip():
        # Most likely caught between truncation and write; a config with no models is written
        # as "model_config_list {}".
        raise ConfigError(f"model config file {path} is empty")
    return parse_model_config(text, str(path))
