"""Finding models and their versions on disk, and deciding which versions to serve.

A version is a folder ``<base_path>/<integer>/``; other entries (hidden, temporary or
non-numeric folders, files) are ignored. A version is *stable*, and only then offered for
loading, when two consecutive scans saw the same content: the same files with the same sizes
and modification times. A folder that is still being copied therefore waits for the next scan.
A version that was stable once stays offered, as last seen stable, while its files change, so
that writing into a served version's folder does not take it out of service.

A model whose folder cannot be listed (missing, a broken link, an I/O error, a broken link
where a version folder was) keeps the plan of its last complete listing: what is on disk is
unknown, and reading it as "no versions" would unload or roll back what serves. The fault is
logged when it starts and when it ends; every scan tries again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from inferd.config import (
    ModelConfig,
    ModelSettings,
    ServerConfig,
    VersionPolicy,
    read_model_config_file,
    read_model_settings,
)
from inferd.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VersionSource:
    """A stable version folder and the fingerprint of its content."""

    version: int
    path: Path
    fingerprint: str


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """What should be served for one model, as of one scan.

    ``error`` is set when the model's settings could not be read; versions not yet loaded
    then fail with it, and loaded ones keep serving.
    """

    name: str
    aspired: Mapping[int, VersionSource]
    labels: Mapping[str, int] = field(default_factory=dict)
    platform: str | None = None
    settings: ModelSettings = field(default_factory=ModelSettings)
    error: str | None = None


def list_versions(base_path: Path) -> dict[int, Path]:
    """``scan_versions``, except that a missing or unreadable base path gives an empty result
    and a warning."""
    try:
        return scan_versions(base_path)
    except OSError as exc:
        log.warning("cannot list %s: %s", base_path, exc.strerror or exc)
        return {}


def scan_versions(base_path: Path) -> dict[int, Path]:
    """Version number -> folder, for every integer-named folder under ``base_path``.

    Two names for one number (``7`` and ``007``): the first in sorted order wins, with a warning.

    Raises:
        OSError: ``base_path`` cannot be listed, or an integer-named entry cannot be examined
            (a broken symbolic link, an I/O error): what is on disk is not known.
    """
    entries = sorted(os.scandir(base_path), key=lambda e: e.name)
    found: dict[int, Path] = {}
    for entry in entries:
        if not (entry.name.isascii() and entry.name.isdigit()):
            continue
        if not entry.is_dir():
            if entry.is_symlink():
                os.stat(entry.path)  # raises for a broken link; a link to a file is no version
            continue
        version = int(entry.name)
        if version in found:
            log.warning(
                "%s and %s both name version %d; using the first",
                found[version],
                entry.path,
                version,
            )
            continue
        found[version] = Path(entry.path)
    return found


def fingerprint(folder: Path) -> str:
    """A digest of the relative paths, sizes and modification times of every file in ``folder``."""
    digest = hashlib.blake2b(digest_size=16)
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished while we looked; the next scan sees the change
            digest.update(f"{os.path.relpath(path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``: a version's size on disk."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Repository:
    """Where models come from: a model config file, a repository folder, or one base path.

    ``scan`` is blocking (it walks folders) and keeps the fingerprints of the previous scan to
    judge stability; call it from one thread at a time.

    ``replace_models`` (HandleReloadConfigRequest) overrides the configured models until it is
    called again or, when the model config file is polled, until that file's models change.
    """

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._previous: dict[Path, str] = {}  # fingerprints seen by the last scan
        self._settled: dict[Path, str] = {}  # the last fingerprint seen stable, per version folder
        self._models: list[ModelConfig] = []
        self._override: list[ModelConfig] | None = None
        self._config_read_at = 0.0
        self._require_stable = config.file_system_poll_wait_seconds > 0
        self._plans: dict[str, ModelPlan] = {}  # the last plan made from a complete listing
        self._faults: dict[str, str] = {}  # models whose folder could not be listed, and why

    def model_configs(self) -> list[ModelConfig]:
        """The configured models, re-reading the model config file when its poll period passed.

        Raises:
            ConfigError: at the first read only; later read failures are logged and the
                previous model list is kept.
        """
        cfg = self._config
        if cfg.model_config_file:
            due = cfg.model_config_file_poll_wait_seconds > 0 and (
                time.monotonic() - self._config_read_at >= cfg.model_config_file_poll_wait_seconds
            )
            if not self._config_read_at or due:
                try:
                    models = read_model_config_file(Path(cfg.model_config_file))
                    if models != self._models:
                        self._models, self._override = models, None
                except ConfigError as exc:
                    if not self._config_read_at:
                        raise
                    log.error("keeping the previous model config: %s", exc)
                self._config_read_at = time.monotonic()
        elif cfg.repository:
            root = Path(cfg.repository)
            try:
                folders = sorted(
                    e.name
                    for e in os.scandir(root)
                    if _is_model_folder(e) and not e.name.startswith((".", "_"))
                )
            except OSError as exc:
                raise ConfigError(f"cannot list model repository {root}: {exc.strerror}") from exc
            self._models = [ModelConfig(name, root / name) for name in folders]
        else:
            if not cfg.model_base_path:
                raise ConfigError(
                    "no models: give --model_base_path, --model_config_file or a repository folder"
                )
            self._models = [ModelConfig(cfg.model_name, Path(cfg.model_base_path))]
        return self._models if self._override is None else self._override

    def _fault(self, name: str, message: str | None) -> None:
        """Log a model's scan fault when it starts or changes, and its end."""
        previous = self._faults.pop(name, None)
        if message is not None:
            self._faults[name] = message
            if message != previous:
                log.error("model %s: %s; keeping what it serves and retrying at the next scan", name, message)
        elif previous is not None:
            log.info("model %s: its folder can be read again", name)

    def replace_models(self, models: list[ModelConfig]) -> None:
        """Serve ``models`` instead of the configured ones (see the class docstring)."""
        self._override = models

    def scan(self, trusted: Collection[str] = ()) -> list[ModelPlan]:
        """Plan every configured model from what is on disk now.

        Versions of the models named in ``trusted`` count as stable at once (an explicit load:
        the caller vouches that their files are complete).
        """
        plans = []
        seen: dict[Path, str] = {}
        settled: dict[Path, str] = {}
        for model in self.model_configs():
            plans.append(self._plan(model, seen, settled, model.name in trusted))
        self._previous, self._settled = seen, settled
        self._plans = {plan.name: plan for plan in plans}
        return plans

    def _plan(
        self, model: ModelConfig, seen: dict[Path, str], settled: dict[Path, str], trusted: bool
    ) -> ModelPlan:
        error = None
        try:
            settings = read_model_settings(model.base_path)
        except ConfigError as exc:
            log.error("model %s: %s", model.name, exc)
            settings, error = ModelSettings(), exc.message
        if self._config.safe:
            settings = dataclasses.replace(settings, safe=True)
        try:
            versions = scan_versions(model.base_path)
        except OSError as exc:
            return self._keep(model, settings, seen, settled, f"cannot list {model.base_path}: {exc}")
        self._fault(model.name, None)
        stable = {}
        for version, path in versions.items():
            seen[path] = fingerprint(path)
            if trusted or not self._require_stable or self._previous.get(path) == seen[path]:
                settled[path] = seen[path]
            elif path in self._settled:
                settled[path] = self._settled[path]  # changing now, but it was stable before
            else:
                continue  # new and still changing: wait for the next scan
            stable[version] = VersionSource(version, path, settled[path])
        policy = model.version_policy or settings.version_policy or VersionPolicy()
        aspired = {v: stable[v] for v in policy.select(stable)}
        return ModelPlan(
            name=model.name,
            aspired=aspired,
            labels=model.labels or settings.labels,
            platform=model.platform,
            settings=settings,
            error=error,
        )

    def _keep(
        self,
        model: ModelConfig,
        settings: ModelSettings,
        seen: dict[Path, str],
        settled: dict[Path, str],
        fault: str,
    ) -> ModelPlan:
        """The model's previous plan, while its folder cannot be listed; what the last scan
        knew of its versions' stability is carried over."""
        self._fault(model.name, fault)
        for known, kept in ((self._previous, seen), (self._settled, settled)):
            kept.update((path, fp) for path, fp in known.items() if path.parent == model.base_path)
        previous = self._plans.get(model.name)
        return previous or ModelPlan(model.name, {}, settings=settings, error=fault)


def _is_model_folder(entry: os.DirEntry[str]) -> bool:
    """A folder, or a link that should lead to one but is broken (a fault, not a removal)."""
    return entry.is_dir() or (entry.is_symlink() and not os.path.exists(entry.path))


def resolve_version(path: Path, name: str | None = None, version: int | None = None) -> ModelPlan:
    """The one version the in-process tools (batch, select, optimize) load: ``path`` as a version
    folder, a base path (its latest version, or ``version``), or a repository holding model
    ``name``; with ``in_process_settings``.

    Raises:
        ModelLoadError: no such version folder. ConfigError: a malformed ``inferd.toml``.
    """
    base = path / name if name else path
    versions = list_versions(base)
    if not versions and base.name.isdigit() and base.is_dir():
        versions, base = {int(base.name): base}, base.parent
    if version is not None:
        versions = {v: p for v, p in versions.items() if v == version}
    if not versions:
        wanted = f"version {version}" if version is not None else "a version folder"
        raise ModelLoadError(f"no model at {base}: expected {wanted} (1/, 2/, ...) or a version folder")
    number = max(versions)
    source = VersionSource(number, versions[number], fingerprint(versions[number]))
    return ModelPlan(name or base.name, {number: source}, settings=in_process_settings(base))


def in_process_settings(folder: Path) -> ModelSettings:
    """``folder``'s ``inferd.toml`` as the in-process tools (batch, optimize, select) load it:
    batching off, since they call the model with whole batches, and no worker process, since they
    use and measure the model itself.

    Raises:
        ConfigError: the file is malformed.
    """
    return dataclasses.replace(read_model_settings(folder), batching=None, isolation="none")
