"""Server and model configuration: TF Serving's flags and model config file, and ``inferd.toml``.

Precedence, highest first: command-line flags, ``INFERD_*`` environment variables (applied by
the CLI), the model config file and each model's ``inferd.toml``, then the defaults here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format

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
    """

    runtime: str | None = None
    runtime_options: Mapping[str, Any] = field(default_factory=dict)
    version_policy: VersionPolicy | None = None
    labels: Mapping[str, int] = field(default_factory=dict)
    signature: Mapping[str, Any] = field(default_factory=dict)
    warmup: bool = True


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


_RUNTIME_TABLES = ("onnx", "sklearn", "python")
_KNOWN_KEYS = {"runtime", "version_policy", "labels", "signature", "warmup", *_RUNTIME_TABLES}


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
    return ModelSettings(
        runtime=runtime,
        runtime_options=_table(options, f"{path}: [{runtime}]"),
        version_policy=None if policy is None else _policy_from_toml(policy, path),
        labels=_labels(raw.get("labels", {}), f"{path}: [labels]"),
        signature=_table(raw.get("signature", {}), f"{path}: [signature]"),
        warmup=warmup,
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


def _labels(value: Any, where: str) -> dict[str, int]:
    table = _table(value, where)
    for label, version in table.items():
        if not label.replace("_", "").isalnum() or not label.isascii():
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
        ConfigError: the text does not parse, or a model lacks a name or base path, or a
            name appears twice.
    """
    message = pb.ModelServerConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
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
    return parse_model_config(text, str(path))
