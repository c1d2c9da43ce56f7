"""Where model files live: a local folder, or a prefix in an object store named by an fsspec URI.

A location (``config.model_location``) is a ``Path`` for a local folder and the URI itself, a
``str``, for an object store (``s3://``, ``gs://``, ``az://``, ...). Each store's
fsspec filesystem is an optional extra (``inferd[s3]``, ``inferd[gcs]``, ``inferd[azure]``),
imported only when a URI of its scheme is used.

Credentials and endpoints come from the environment, as the clouds' SDKs read them
(``AWS_*``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``),
and for S3 also as TensorFlow Serving reads them: ``S3_ENDPOINT`` (``host[:port]`` or a URL),
``S3_USE_HTTPS`` (``0`` for plain HTTP), ``S3_VERIFY_SSL`` (``0`` to skip certificate checks)
and ``AWS_REGION``.

Every failure to reach or read a store is raised as ``StorageError`` (an ``OSError``), so that
callers treat an unreachable store like an unreadable folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from inferd.config import OBJECT_STORES, SETTINGS_FILE, model_location
from inferd.errors import ConfigError, InvalidArgument
from inferd.model_cache import ModelCache

log = logging.getLogger(__name__)

_MAX_VERSION = 2**63 - 1  # as repository.MAX_VERSION: TF Serving reads version names as int64


class StorageError(OSError):
    """An object store could not be reached or read; the message names the URI and the cause."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing shows it: its size in bytes and its ETag (or modification time
    where the store has no ETag)."""

    size: int
    etag: str


def listing_fingerprint(listing: Mapping[str, ObjectInfo]) -> str:
    """A digest of the relative keys, sizes and ETags of a listing."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(listing):
        info = listing[key]
        digest.update(f"{key}\0{info.size}\0{info.etag}\n".encode())
    return digest.hexdigest()


def s3_options() -> dict[str, Any]:
    """s3fs options from TF Serving's S3 variables; what they leave out, botocore reads itself
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...)."""
    env = os.environ
    client: dict[str, Any] = {}
    endpoint = env.get("S3_ENDPOINT")
    use_https = env.get("S3_USE_HTTPS", "1") not in ("0", "false", "False")
    if endpoint:
        if "://" not in endpoint:
            endpoint = f"{'https' if use_https else 'http'}://{endpoint}"
        client["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if env.get("S3_VERIFY_SSL", "1") in ("0", "false", "False"):
        client["verify"] = False
    return {
        "client_kwargs": client,
        "use_listings_cache": False,
        "skip_instance_cache": True,
        # An unreachable store should fail a scan within seconds, not minutes of retries.
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2}},
    }


class ObjectStore:
    """The fsspec filesystem for one URI scheme. Thread-safe as fsspec's filesystems are; every
    method blocks on the network and raises ``StorageError`` on any failure."""

    def __init__(self, uri: str) -> None:
        scheme = uri.partition("://")[0].lower()
        protocol, extra = OBJECT_STORES[scheme]
        try:
            import fsspec
        except ImportError as exc:
            raise ConfigError(
                f"{uri}: reading object stores needs fsspec: pip install 'inferd[{extra}]'"
            ) from exc
        options = s3_options() if protocol == "s3" else {"skip_instance_cache": True}
        try:
            self._fs: Any = fsspec.filesystem(protocol, **options)
        except ImportError as exc:
            raise ConfigError(
                f"{uri}: the {protocol} filesystem is not installed: pip install 'inferd[{extra}]'"
            ) from exc
        except Exception as exc:
            raise StorageError(f"{uri}: cannot open the store: {_describe(exc)}") from exc

    @staticmethod
    def _strip(uri: str) -> str:
        return uri.partition("://")[2].rstrip("/")

    def list_tree(self, uri: str) -> dict[str, ObjectInfo]:
        """Every object under ``uri``, by key relative to it ("1/model.onnx"); empty when there
        are none. Folder markers (keys ending in "/", as consoles make them) are left out."""
        root = self._strip(uri)
        try:
            self._fs.invalidate_cache()
            found = self._fs.find(root, detail=True)
        except Exception as exc:
            raise StorageError(f"cannot list {uri}: {_describe(exc)}") from exc
        listing = {}
        for path, info in found.items():
            if info.get("type") == "directory" or not path.startswith(root + "/") or path.endswith("/"):
                continue
            etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or ""
            listing[path[len(root) + 1 :]] = ObjectInfo(int(info.get("size") or 0), str(etag).strip('"'))
        return listing

    def folders(self, uri: str) -> list[str]:
        """The names of the "folders" (common prefixes) directly under ``uri``."""
        root = self._strip(uri)
        try:
            self._fs.invalidate_cache()
            entries = self._fs.ls(root, detail=True)
        except Exception as exc:
            raise StorageError(f"cannot list {uri}: {_describe(exc)}") from exc
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
        )

    def download(self, uri: str, keys: list[str], dest: Path) -> None:
        """Copy the objects ``keys`` (relative to ``uri``) to the same relative paths under ``dest``.

        Raises:
            StorageError: also, before anything is copied, for a key that does not name a path
                inside ``dest`` (an empty, ``.`` or ``..`` part).
        """
        root = self._strip(uri)
        for key in keys:
            if any(part in ("", ".", "..") for part in key.split("/")):
                raise StorageError(
                    f"{uri}/{key}: an object key with an empty, '.' or '..' part is not copied"
                )
        for key in keys:
            target = dest / key
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._fs.get_file(f"{root}/{key}", str(target))
            except Exception as exc:
                raise StorageError(f"cannot download {uri}/{key}: {_describe(exc)}") from exc

    def download_file(self, uri: str, dest: Path) -> None:
        """Copy the object ``uri`` to the file ``dest``."""
        try:
            self._fs.get_file(self._strip(uri), str(dest))
        except Exception as exc:
            raise StorageError(f"cannot download {uri}: {_describe(exc)}") from exc

    def upload_file(self, source: Path, uri: str) -> None:
        """Copy the local file ``source`` to the object ``uri``."""
        try:
            self._fs.put_file(str(source), self._strip(uri))
        except Exception as exc:
            raise StorageError(f"cannot upload {source} to {uri}: {_describe(exc)}") from exc

    def exists(self, uri: str) -> bool:
        try:
            self._fs.invalidate_cache()
            return bool(self._fs.exists(self._strip(uri)))
        except Exception as exc:
            raise StorageError(f"cannot reach {uri}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


class Scratch:
    """Local stand-ins for the object-store paths of a one-shot command (``inferd batch``,
    ``select``, ``optimize``): remote inputs are copied into a scratch folder, remote outputs are
    written there and uploaded by ``publish``; local paths pass through. ``close`` removes the
    folder. Not thread-safe.
    """

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._uploads: list[tuple[Path, str]] = []

    def _place(self, uri: str) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="inferd-scratch-"))
        # one folder per path, so that two URIs ending in the same name do not meet
        place = self._folder / str(len(list(self._folder.iterdir()))) / uri.rsplit("/", 1)[-1]
        place.parent.mkdir(parents=True, exist_ok=True)
        return place

    def input(self, text: str, what: str) -> str:
        """A local path for ``text``: the object, or every object under the prefix, copied in.

        Raises:
            InvalidArgument: nothing is at the URI, or the store cannot be read; the message
                starts with ``what`` (the argument's name).
        """
        uri = model_location(text)
        if isinstance(uri, Path):
            return text
        try:
            store = ObjectStore(uri)
            listing = store.list_tree(uri)
            target = self._place(uri)
            if listing:
                store.download(uri, sorted(listing), target)
            elif store.exists(uri):
                store.download_file(uri, target)
            else:
                raise StorageError(f"nothing found at {uri}")
        except StorageError as exc:
            raise InvalidArgument(f"{what}: {exc}") from exc
        return str(target)

    def model(self, text: str, what: str, model_name: str | None = None, version: int | None = None) -> Path:
        """A local path for a model named by ``text``: with ``model_name``, a repository holding
        that model; else a base path or a version folder. Of a base path's numbered version
        folders, only the one used (``version`` or the latest) is copied, with the files beside
        them (``inferd.toml``).

        Raises:
            InvalidArgument: as ``input``.
        """
        uri = model_location(text)
        if isinstance(uri, Path):
            return uri
        base = f"{uri}/{model_name}" if model_name else uri
        try:
            store = ObjectStore(base)
            listing = store.list_tree(base)
            if not listing:
                raise StorageError(f"nothing found under {base}")
            tops = {k.split("/", 1)[0] for k in listing if "/" in k}
            numbers = {int(t) for t in tops if t.isascii() and t.isdigit()}
            keys = list(listing)
            if numbers:
                chosen = str(version if version in numbers else max(numbers))
                keys = [k for k in listing if "/" not in k or k.split("/", 1)[0] == chosen]
            target = self._place(uri)
            store.download(base, sorted(keys), target / model_name if model_name else target)
        except StorageError as exc:
            raise InvalidArgument(f"{what}: {exc}") from exc
        return target

    def output(self, text: str, what: str) -> Path:
        """A local path to write ``text`` at; a remote one is uploaded by ``publish``."""
        uri = model_location(text)
        if isinstance(uri, Path):
            return uri
        target = self._place(uri)
        self._uploads.append((target, uri))
        return target

    def publish(self) -> None:
        """Upload every output written (a file, or a folder's files by relative path).

        Raises:
            InvalidArgument: an upload failed; the message names the URI and the cause.
        """
        for local, uri in self._uploads:
            try:
                if local.is_file():
                    ObjectStore(uri).upload_file(local, uri)
                elif local.is_dir():
                    store = ObjectStore(uri)
                    for path in sorted(p for p in local.rglob("*") if p.is_file()):
                        store.upload_file(path, f"{uri}/{path.relative_to(local).as_posix()}")
            except StorageError as exc:
                raise InvalidArgument(f"cannot write {uri}: {exc}") from exc

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class ListedVersion:
    """A version as a listing shows it: its number, where it is (a folder or a URI), and the
    fingerprint of its content. ``objects`` and ``size_bytes`` are known for object stores."""

    version: int
    where: Path | str
    fingerprint: str
    size_bytes: int = 0
    objects: Mapping[str, ObjectInfo] = field(default_factory=dict)


class Storage(Protocol):
    """Where one model's versions live. Methods block (disk or network); call them from one
    thread at a time.

    The repository lists (``versions``), judges stability from the fingerprints, chooses the
    versions to serve, and only then asks for their local files (``fetch``).
    """

    def versions(self) -> dict[int, ListedVersion]:
        """Every version now present, by number.

        Raises:
            OSError: the location cannot be listed; what it holds is unknown.
        """
        ...

    def settings_folder(self) -> Path:
        """A local folder holding the model's ``inferd.toml`` as of the last ``versions`` call
        (absent if the model has none)."""
        ...

    def verified(self, listed: ListedVersion) -> bool:
        """Whether ``listed`` is already known complete (a verified local copy of exactly that
        content exists), so it need not wait to look stable."""
        ...

    def fetch(self, listed: ListedVersion) -> Path:
        """A local folder holding exactly the content ``listed`` describes.

        Raises:
            OSError: it cannot be had now (store unreachable, cache full, or the content
                changed while it was copied); a later call may succeed.
        """
        ...


class RemoteStorage:
    """A model under an object-store URI: listing from the store, files from ``cache``.

    A version is downloaded whole into the cache, then listed again: if any object's size or
    ETag differs from the listing it was chosen by, or a file's size differs from its listing,
    the copy is discarded and ``fetch`` raises (the next poll sees the changed listing and waits
    for it to be stable again).
    """

    def __init__(self, base: str, cache: ModelCache) -> None:
        self.base = base
        self._cache = cache
        self._store = ObjectStore(base)
        # the local copy of inferd.toml; removed when this object is collected or at exit
        self._settings_dir = tempfile.TemporaryDirectory(prefix="inferd-settings-")
        self._settings = Path(self._settings_dir.name)
        self._settings_tag: ObjectInfo | None = None
        self._top: dict[str, ObjectInfo] = {}
        self._ignored: set[str] = set()  # version names past int64, warned about once

    def versions(self) -> dict[int, ListedVersion]:
        try:
            listing = self._store.list_tree(self.base)
        except StorageError:
            # A new client at the next poll reads the credentials again (a rotated key, a
            # credentials file fixed by hand): recovery needs no restart.
            self._store = ObjectStore(self.base)
            raise
        if not listing:
            # An object store has no empty folders: nothing here is a missing folder (a wrong
            # path or a failed sync), not a model without versions.
            raise StorageError(f"nothing found under {self.base}")
        groups: dict[str, dict[str, ObjectInfo]] = {}
        self._top = {}
        for key, info in listing.items():
            top, sep, rest = key.partition("/")
            if sep:
                groups.setdefault(top, {})[rest] = info
            else:
                self._top[key] = info
        found: dict[int, ListedVersion] = {}
        for name in sorted(groups):
            if not (name.isascii() and name.isdigit()):
                continue
            version = int(name)
            if version > _MAX_VERSION:
                if name not in self._ignored:
                    log.warning("ignoring %s/%s: a version number must fit in int64", self.base, name)
                    self._ignored.add(name)
                continue
            if version in found:
                log.warning(
                    "%s and %s/%s both name version %d; using the first",
                    found[version].where,
                    self.base,
                    name,
                    version,
                )
                continue
            objects = groups[name]
            found[version] = ListedVersion(
                version,
                f"{self.base}/{name}",
                listing_fingerprint(objects),
                sum(info.size for info in objects.values()),
                objects,
            )
        return found

    def settings_folder(self) -> Path:
        info = self._top.get(SETTINGS_FILE)
        target = self._settings / SETTINGS_FILE
        if info is None:
            target.unlink(missing_ok=True)
        elif info != self._settings_tag:
            self._store.download_file(f"{self.base}/{SETTINGS_FILE}", target)
        self._settings_tag = info
        return self._settings

    def verified(self, listed: ListedVersion) -> bool:
        return self._cache.lookup(str(listed.where), listed.fingerprint, use=False) is not None

    def fetch(self, listed: ListedVersion) -> Path:
        uri = str(listed.where)
        local = self._cache.lookup(uri, listed.fingerprint)
        if local is not None:
            return local
        if listing_fingerprint(listed.objects) != listed.fingerprint:
            raise StorageError(f"{uri} changed since it was complete; waiting for it to be stable again")

        def fill(folder: Path) -> None:
            self._store.download(uri, sorted(listed.objects), folder)
            after = self._store.list_tree(uri)
            changed = sorted(set(after.items()) ^ set(listed.objects.items()))
            if changed:
                raise StorageError(
                    f"{uri} changed while it was downloaded ({changed[0][0]} and {len(changed) - 1} more); "
                    "fetching it again once its listing is stable"
                )
            for key, info in listed.objects.items():
                size = (folder / key).stat().st_size
                if size != info.size:
                    raise StorageError(f"{uri}/{key}: downloaded {size} bytes, the listing says {info.size}")
            log.info(
                "downloaded %s (%d files, %d bytes) into the model cache",
                uri,
                len(listed.objects),
                listed.size_bytes,
            )

        return self._cache.add(uri, listed.fingerprint, listed.size_bytes, fill)
