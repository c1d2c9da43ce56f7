"""Finding models and their versions on disk, and deciding which versions to serve.

A version is a folder ``<base_path>/<integer>/``; other entries (hidden, temporary or
non-numeric folders, files) are ignored. A version is *stable*, and only then offered for
loading, when two consecutive scans saw the same content: the same files with the same sizes
and modification times. A folder that is still being copied therefore waits for the next scan.
Only the first scan without polling (``--file_system_poll_wait_seconds=0``) takes every version
at once; a scan made later all the same (a model config file poll, an admin call) does not.
A version that was stable once stays offered, as last seen stable, while its files change, so
that writing into a served version's folder does not take it out of service. A model whose
versions are all new and waiting (its base path just changed in the model config file, or its
only version was replaced) keeps the versions of its previous plan meanwhile: waiting never
unloads what serves.

A model whose folder cannot be listed (missing, a broken link, an I/O error, a broken link
where a version folder was) keeps the plan of its last complete listing: what is on disk is
unknown, and reading it as "no versions" would unload or roll back what serves. The fault is
logged when it starts and when it ends; every scan tries again.

Where a model's files live is a ``Storage`` (``storage.py``): ``LocalStorage`` here for a
folder, ``RemoteStorage`` for an object-store URI. The same rules apply to both, with a listing's
keys, sizes and ETags as the fingerprint of a remote version; a remote version is downloaded
into the model cache only once the policy chooses it, and the plan names its local copy.

Other faults a scan finds (an ``inferd.toml`` or model config file that does not read, a model
file put directly in the base path instead of a version folder) are logged once each, again only
when the file behind them changes, and their end is logged too: a poll every second repeats
nothing.
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
    SETTINGS_FILE,
    ModelConfig,
    ModelSettings,
    ServerConfig,
    VersionPolicy,
    model_location,
    read_model_config_file,
    read_model_settings,
    with_server_flags,
)
from inferd.errors import ConfigError, ModelLoadError
from inferd.model_cache import ModelCache, default_cache_dir
from inferd.storage import ListedVersion, ObjectStore, RemoteStorage, Storage

log = logging.getLogger(__name__)

_Key = tuple[Path | str, int]  # a model's base path and a version number


@dataclass(frozen=True, slots=True)
class VersionSource:
    """A stable version folder and the fingerprint of its content."""

    version: int
    path: Path
    fingerprint: str


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """What should be served for one model, as of one scan.

    ``error`` is set when the model's settings could not be read; the last settings read (or the
    defaults, at the first scan) stand meanwhile, versions not yet loaded fail with it, and loaded
    ones keep serving.
    """

    name: str
    aspired: Mapping[int, VersionSource]
    labels: Mapping[str, int] = field(default_factory=dict)
    platform: str | None = None
    settings: ModelSettings = field(default_factory=ModelSettings)
    error: str | None = None


MAX_VERSION = 2**63 - 1
"""The largest version number: TF Serving reads version folder names as int64 and ignores the rest."""


def list_versions(base_path: Path) -> dict[int, Path]:
    """``scan_versions``, except that a missing or unreadable base path gives an empty result
    and a warning."""
    try:
        return scan_versions(base_path)
    except OSError as exc:
        log.warning("cannot list %s: %s", base_path, exc.strerror or exc)
        return {}


def scan_versions(base_path: Path, ignored: set[Path] | None = None) -> dict[int, Path]:
    """Version number -> folder, for every integer-named folder under ``base_path``.

    Two names for one number (``7`` and ``007``): the first in sorted order wins, with a warning.
    A name past int64 (``9223372036854775808``) is no version, as in TF Serving: it is skipped
    with a warning, logged once per folder when the caller passes the same ``ignored`` set to
    every scan (which records it), and at every scan otherwise. Leading zeros are accepted.

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
        if version > MAX_VERSION:
            path = Path(entry.path)
            if ignored is None or path not in ignored:
                log.warning("ignoring %s: a version number must fit in int64 (at most %d)", path, MAX_VERSION)
                if ignored is not None:
                    ignored.add(path)
            continue
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
    """A digest of the relative paths, sizes and modification times of every file in ``folder``,
    but for Python's bytecode caches (``__pycache__``), which loading a Python model may write."""
    digest = hashlib.blake2b(digest_size=16)
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if name != "__pycache__")
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished while we looked; the next scan sees the change
            digest.update(f"{os.path.relpath(path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class LocalStorage:
    """A model in a local folder: ``Storage`` over ``scan_versions`` and ``fingerprint``;
    ``ignored`` as ``scan_versions`` takes it."""

    def __init__(self, base: Path, ignored: set[Path]) -> None:
        self.base = base
        self._ignored = ignored

    def versions(self) -> dict[int, ListedVersion]:
        found = scan_versions(self.base, self._ignored)
        return {v: ListedVersion(v, path, fingerprint(path)) for v, path in found.items()}

    def settings_folder(self) -> Path:
        return self.base

    def verified(self, listed: ListedVersion) -> bool:
        return False

    def fetch(self, listed: ListedVersion) -> Path:
        return Path(listed.where)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``: a version's size on disk."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Repository:
    """Where models come from: a model config file, a repository folder, or one base path.

    ``scan`` is blocking (it walks folders) and keeps the fingerprints of the previous scan to
    judge stability; call it from one thread at a time.

    ``replace_models`` (HandleReloadConfigRequest) overrides the configured models until it is
    called again or, when the model config file is polled, until a read of that file lists other
    models than the ones it replaced (also when that read is a new process's first).
    """

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._previous: dict[_Key, str] = {}  # fingerprints seen by the last scan
        self._settled: dict[_Key, str] = {}  # the last fingerprint seen stable, per version
        self._models: list[ModelConfig] = []
        self._ignored: set[Path] = set()  # version folders named past int64, warned about once
        self._override: list[ModelConfig] | None = None
        self._replaced: list[ModelConfig] = []  # the configured models the override replaced
        self._config_read_at = 0.0
        # Without polling, the first scan loads what it lists; a later one (a model config file
        # poll, an admin call) is a repeated scan, where stability is judged as when polling.
        self._require_stable = config.file_system_poll_wait_seconds > 0
        self._plans: dict[str, ModelPlan] = {}  # the last plan made from a complete listing
        self._faults: dict[str, str] = {}  # models whose folder could not be listed, and why
        self._storages: dict[Path | str, Storage] = {}
        self._cache: ModelCache | None = None  # made when the first object-store model is planned
        self._protected: set[str] = set()  # cached versions the last scan planned (see _protect)
        self._protecting: set[str] = set()  # and those the scan in progress has planned
        self._fault_log = FaultLog()
        self._no_versions: dict[str, str] = {}  # models without a version folder, and what to do

    def model_configs(self) -> list[ModelConfig]:
        """The configured models, re-reading the model config file when its poll period passed.

        Raises:
            ConfigError: at the first read only (of a repository folder or store: while no model
                was listed); later read failures are logged once and the previous model list is
                kept.
        """
        cfg = self._config
        if cfg.model_config_file:
            due = cfg.model_config_file_poll_wait_seconds > 0 and (
                time.monotonic() - self._config_read_at >= cfg.model_config_file_poll_wait_seconds
            )
            if not self._config_read_at or due:
                try:
                    self._models = read_model_config_file(Path(cfg.model_config_file))
                except ConfigError as exc:
                    if not self._config_read_at:
                        raise
                    self._fault_log.report(
                        "model_config_file",
                        f"keeping the previous model config: {exc.message}",
                        Path(cfg.model_config_file),
                    )
                else:
                    self._fault_log.clear("model_config_file", f"{cfg.model_config_file} reads again")
                self._config_read_at = time.monotonic()
            if cfg.model_config_file_poll_wait_seconds > 0 and self._models != self._replaced:
                self._override = None  # the file changed since: its models hold again
        elif cfg.repository and isinstance(remote := model_location(cfg.repository), str):
            try:
                names = ObjectStore(remote).folders(remote)
            except OSError as exc:
                if not self._models:
                    raise ConfigError(f"cannot list model repository {remote}: {exc}") from exc
                self._fault(remote, str(exc))  # keep the models of the last listing
            else:
                self._fault(remote, None)
                self._models = [
                    ModelConfig(name, f"{remote}/{name}") for name in names if not name.startswith((".", "_"))
                ]
        elif cfg.repository:
            root = Path(cfg.repository)
            try:
                folders = sorted(
                    e.name
                    for e in os.scandir(root)
                    if _is_model_folder(e) and not e.name.startswith((".", "_"))
                )
            except OSError as exc:
                if not self._models:
                    raise ConfigError(f"cannot list model repository {root}: {exc.strerror}") from exc
                self._fault(str(root), f"cannot list model repository: {exc.strerror}")  # keep the models
            else:
                self._fault(str(root), None)
                self._models = [ModelConfig(name, root / name) for name in folders]
        else:
            if not cfg.model_base_path:
                raise ConfigError(
                    "no models: give --model_base_path, --model_config_file or a repository folder"
                )
            self._models = [ModelConfig(cfg.model_name, model_location(cfg.model_base_path))]
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

    def plan(self, name: str) -> ModelPlan | None:
        """The last scan's plan for model ``name``; None before one, or for an unknown model."""
        return self._plans.get(name)

    def configured(self) -> list[ModelConfig]:
        """The models the configuration names, as read last, whatever replaces them."""
        return list(self._models)

    @property
    def replacing(self) -> bool:
        """Whether models given to ``replace_models`` are served instead of the configured ones."""
        return self._override is not None

    def replace_models(self, models: list[ModelConfig], replaced: list[ModelConfig] | None = None) -> None:
        """Serve ``models`` instead of ``replaced``, the configured models (default: the ones read
        last); see the class docstring for how long."""
        self._override = models
        self._replaced = self.configured() if replaced is None else list(replaced)

    def scan(self, trusted: Collection[str] = ()) -> list[ModelPlan]:
        """Plan every configured model from what is on disk (or in its store) now.

        Versions of the models named in ``trusted`` count as stable at once (an explicit load:
        the caller vouches that their files are complete). A chosen version in an object store
        is downloaded into the model cache here, before the plan names it.
        """
        plans = []
        seen: dict[_Key, str] = {}
        settled: dict[_Key, str] = {}
        self._protecting = set()
        for model in self.model_configs():
            plans.append(self._plan(model, seen, settled, model.name in trusted))
        self._previous, self._settled = seen, settled
        self._require_stable = True
        self._plans = {plan.name: plan for plan in plans}
        self._protect(self._protecting, replace=True)
        return plans

    def _protect(self, uris: set[str], replace: bool = False) -> None:
        """Keep the cached versions at ``uris`` from eviction: the ones the last scan planned,
        plus those this scan has chosen so far, until the scan ends (``replace``)."""
        self._protected = uris if replace else self._protected | uris
        if self._cache is not None:
            self._cache.protect(self._protected)

    def _storage(self, model: ModelConfig) -> Storage:
        """The model's ``Storage``, made at its first scan and kept (a remote one holds state)."""
        storage = self._storages.get(model.base_path)
        if storage is None:
            if isinstance(model.base_path, Path):
                storage = LocalStorage(model.base_path, self._ignored)
            else:
                if self._cache is None:
                    cfg = self._config
                    folder = Path(cfg.model_cache_dir) if cfg.model_cache_dir else default_cache_dir()
                    self._cache = ModelCache(folder, cfg.model_cache_bytes)
                storage = RemoteStorage(model.base_path, self._cache)
            self._storages[model.base_path] = storage
        return storage

    def _plan(
        self, model: ModelConfig, seen: dict[_Key, str], settled: dict[_Key, str], trusted: bool
    ) -> ModelPlan:
        error = None
        settings_key = f"settings:{model.name}"
        try:
            storage = self._storage(model)
            versions = storage.versions()
            settings_folder = storage.settings_folder()
        except OSError as exc:
            return self._keep(
                model,
                seen,
                settled,
                str(exc) if isinstance(model.base_path, str) else f"cannot list {model.base_path}: {exc}",
            )
        try:
            settings = read_model_settings(settings_folder)
        except ConfigError as exc:
            self._fault_log.report(
                settings_key,
                f"model {model.name}: {exc.message}; versions not loaded yet fail with this until "
                "the file is fixed (logged again only when it changes)",
                settings_folder / SETTINGS_FILE,
            )
            previous = self._plans.get(model.name)  # its policy, labels and split stay as they were
            settings, error = (previous.settings if previous else ModelSettings()), exc.message
        else:
            self._fault_log.clear(settings_key, f"model {model.name}: {SETTINGS_FILE} reads again")
        if self._config.safe:
            settings = dataclasses.replace(settings, safe=True)
        settings = with_server_flags(settings, self._config)
        self._fault(model.name, None)
        self._check_layout(model, versions)
        stable = {}
        for version, listed in versions.items():
            key = (model.base_path, version)
            seen[key] = listed.fingerprint
            if (
                trusted
                or not self._require_stable
                or self._previous.get(key) == seen[key]
                or storage.verified(listed)
            ):
                settled[key] = seen[key]
            elif key in self._settled:
                settled[key] = self._settled[key]  # changing now, but it was stable before
            else:
                continue  # new and still changing: wait for the next scan
            stable[version] = dataclasses.replace(listed, fingerprint=settled[key])
        policy = model.version_policy or settings.version_policy or VersionPolicy()
        previous = self._plans.get(model.name)
        if versions and not stable and previous is not None:
            aspired = previous.aspired  # every version waits for the next scan: serve what served
            self._protecting |= self._protected
        else:
            aspired = self._fetch(model.name, storage, policy, stable)
        return ModelPlan(
            name=model.name,
            aspired=aspired,
            labels=model.labels or settings.labels,
            platform=model.platform,
            settings=settings,
            error=error,
        )

    def _fetch(
        self, name: str, storage: Storage, policy: VersionPolicy, stable: dict[int, ListedVersion]
    ) -> dict[int, VersionSource]:
        """The versions ``policy`` chooses among ``stable`` with their local folders. A version
        that cannot be fetched now is left out and the policy chooses again among the rest, so
        that a download that fails never takes the place of what serves."""
        candidates = dict(stable)
        local: dict[int, Path] = {}
        while True:
            chosen = policy.select(candidates)
            missing = None
            for version in chosen:
                if version in local:
                    continue
                try:
                    local[version] = storage.fetch(candidates[version])
                    if isinstance(where := candidates[version].where, str):
                        self._protecting.add(where)
                        self._protect({where})
                    self._fault(f"{name}/{version}", None)
                except OSError as exc:
                    self._fault(f"{name}/{version}", f"cannot fetch version {version}: {exc}")
                    missing = version
                    break
            if missing is None:
                return {v: VersionSource(v, local[v], candidates[v].fingerprint) for v in chosen}
            del candidates[missing]

    def _check_layout(self, model: ModelConfig, versions: Mapping[int, object]) -> None:
        """Note (and log once) a model with no version folder, saying how to make one."""
        key = f"layout:{model.name}"
        if versions:
            self._no_versions.pop(model.name, None)
            self._fault_log.clear(key, f"model {model.name}: version folders found in {model.base_path}")
            return
        base = model.base_path
        stray = stray_entries(base) if isinstance(base, Path) else []
        if stray and isinstance(base, Path):
            what = " and ".join(", ".join(stray).rsplit(", ", 1))
            why = (
                f"no version folder in {base}, which holds {what} directly; a model's files go in a "
                f"numbered version folder: move {what} into {base / '1'}/"
            )
        else:
            why = f"no version folders (1/, 2/, ...) in {base} yet"
        self._no_versions[model.name] = why
        level = logging.ERROR if stray else logging.WARNING
        self._fault_log.report(key, f"model {model.name}: {why}", level=level)

    def why_unversioned(self) -> dict[str, str]:
        """Models whose last scan found no version folder, and what to do about it."""
        return dict(self._no_versions)

    def _keep(
        self, model: ModelConfig, seen: dict[_Key, str], settled: dict[_Key, str], fault: str
    ) -> ModelPlan:
        """The model's previous plan, while its folder cannot be listed; what the last scan
        knew of its versions' stability is carried over."""
        self._fault(model.name, fault)
        self._protecting |= {u for u in self._protected if u.startswith(f"{model.base_path}/")}
        for known, kept in ((self._previous, seen), (self._settled, settled)):
            kept.update((key, fp) for key, fp in known.items() if key[0] == model.base_path)
        previous = self._plans.get(model.name)
        return previous or ModelPlan(model.name, {}, error=fault)


class FaultLog:
    """Logs each fault once: when it appears, again when its message or the file behind it
    changes, and its end. Keys name a fault's place (a model, a file); call from one thread."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[str, object]] = {}  # key -> (message, state of its file)

    def report(self, key: str, message: str, source: Path | None = None, level: int = logging.ERROR) -> None:
        """``message`` holds at ``key`` now; logged at ``level`` unless it was logged already and
        ``source`` (the file at fault) did not change since."""
        seen = (message, _file_state(source))
        if self._open.get(key) != seen:
            log.log(level, "%s", message)
        self._open[key] = seen

    def clear(self, key: str, ended: str) -> None:
        """The fault at ``key`` (if any) is over; logs ``ended`` at INFO when there was one."""
        if self._open.pop(key, None) is not None:
            log.info("%s", ended)


def _file_state(path: Path | None) -> object:
    """What tells one version of a file from the next: its size and modification time."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return (st.st_size, st.st_mtime_ns)


def stray_entries(base_path: Path) -> list[str]:
    """Names in ``base_path`` that look like a model put there directly instead of in a version
    folder: every file and non-numeric folder but ``inferd.toml`` and hidden (``.``, ``_``)
    entries; sorted, folders with a trailing ``/``. Empty when it cannot be listed."""
    try:
        entries = list(os.scandir(base_path))
    except OSError:
        return []
    stray = [
        f"{e.name}/" if e.is_dir() else e.name
        for e in entries
        if not e.name.startswith((".", "_")) and e.name != SETTINGS_FILE and not e.name.isdigit()
    ]
    return sorted(stray)


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
    found = versions
    if version is not None:
        versions = {v: p for v, p in versions.items() if v == version}
    if not versions:
        raise ModelLoadError(_no_version(path, name, version, base, found))
    number = max(versions)
    source = VersionSource(number, versions[number], fingerprint(versions[number]))
    return ModelPlan(name or base.name, {number: source}, settings=in_process_settings(base))


def _no_version(path: Path, name: str | None, version: int | None, base: Path, found: dict[int, Path]) -> str:
    """What ``resolve_version`` looked for at ``base`` and what is there instead."""
    if found:
        return f"{base} has no version {version}; its versions are {sorted(found)}"
    looked = (
        f"no model at {base}: looked for a numbered version folder inside it ({base}/1/, {base}/2/, ...) "
        f"or for {base} to be one"
    )
    if name:
        looked += f" (MODEL {path} as a repository, --model {name})"
    if not base.exists():
        siblings = sorted(p.name for p in base.parent.iterdir() if p.is_dir()) if base.parent.is_dir() else []
        return f"{looked}; {base} does not exist" + (
            f" ({base.parent} holds {siblings[:10]})" if siblings else ""
        )
    if not base.is_dir():
        return f"{looked}; {base} is a file: MODEL is the folder that holds the version folders"
    entries = sorted(
        p.name + ("/" if p.is_dir() else "") for p in base.iterdir() if not p.name.startswith(".")
    )
    shown = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "")
    return f"{looked}; it holds {shown or 'nothing'}" + (
        f": put the model files in {base}/1/" if any(not e.endswith("/") for e in entries) else ""
    )


def in_process_settings(folder: Path) -> ModelSettings:
    """``folder``'s ``inferd.toml`` as the in-process tools (batch, optimize, select) load it:
    batching off, since they call the model with whole batches, and no worker process, since they
    use and measure the model itself.

    Raises:
        ConfigError: the file is malformed.
    """
    return dataclasses.replace(read_model_settings(folder), batching=None, isolation="none")
