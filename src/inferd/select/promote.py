"""Promotion: copy the winner into a model's base path as its next version, and move a label.

The copy goes to a hidden folder inside the base path (``.inferd-promote-N-PID``, which the
repository scan ignores), then is renamed to ``N``: a running inferd sees the version appear
whole, in one step, and loads it at its next scan. A label moves in the model config file
(TF Serving's text format, rewritten whole and renamed over the old file; comments are not kept).
With ``wait_url`` the label moves only once the server answers that the new version is
AVAILABLE, so requests by label never meet a version that is still loading.

With a ``Canary``, the label does not move at once: once the server serves the new version, a
guarded canary rollout (``inferd.rollout``, the one ``inferd rollout`` starts) moves the server's
traffic to it step by step and moves the label on the server at its end; only then is the label
moved in the config file too (``finish``). A rolled-back canary leaves the label where it was.
"""

from __future__ import annotations

import difflib
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import orjson
from google.protobuf import text_format

from inferd._proto import model_server_config_pb2 as pb
from inferd.config import SETTINGS_FILE, VersionPolicy, parse_model_config, read_model_settings
from inferd.errors import ConfigError, InvalidArgument, ModelLoadError
from inferd.repository import list_versions

_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class Canary:
    """``--canary``: promote through a guarded rollout on the server at ``--wait_url``; the fields
    are ``inferd rollout``'s (see ``Rollouts.start``)."""

    steps: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 100.0)
    step_s: float = 60.0
    guards: tuple[str, ...] = ()
    on_restart: str = "rollback"
    admin_token: str = ""
    min_requests: int = 0

    def body(self, version: int, label: str) -> dict[str, object]:
        """The start body of the admin route ``.../rollout`` for a rollout to ``version``."""
        return {
            "to": version,
            "label": label,
            "steps": list(self.steps),
            "step_s": self.step_s,
            "guards": list(self.guards),
            "on_restart": self.on_restart,
            "min_requests": self.min_requests,
        }


@dataclass(frozen=True, slots=True)
class Promotion:
    """One planned promotion: the version number to copy to, and the config file before and after."""

    base: Path
    model_name: str
    version: int
    label: str | None = None
    config_file: Path | None = None
    config_before: str = ""
    config_with_version: str = ""
    """The config with the new version made servable but the label not yet moved (equal to
    ``config_before`` unless the policy lists specific versions)."""
    config_after: str = ""
    notes: tuple[str, ...] = ()

    @property
    def staging(self) -> Path:
        return self.base / f".inferd-promote-{self.version}-{os.getpid()}"

    def describe(self, source: Path) -> str:
        """The exact change of promoting ``source``, as text: the copy, the rename, and a unified
        diff of the config file."""
        lines = [
            f"copy {source} -> {self.staging}",
            f"rename {self.staging} -> {self.base / str(self.version)}",
        ]
        if self.config_file is not None and self.config_after != self.config_before:
            lines.append(f"rewrite {self.config_file}:")
            lines += difflib.unified_diff(
                self.config_before.splitlines(),
                self.config_after.splitlines(),
                str(self.config_file),
                f"{self.config_file} (new)",
                lineterm="",
            )
        notes = list(self.notes)
        if (source / SETTINGS_FILE).is_file():
            notes.append(
                f"{source / SETTINGS_FILE} is copied with the version, but the model's settings are "
                f"read from {self.base / SETTINGS_FILE}"
            )
        lines += [f"note: {note}" for note in notes]
        return "\n".join(lines)


def plan(base: Path, label: str | None, config_file: Path | None, canary: bool = False) -> Promotion:
    """Plan adding a version to ``base`` as its next version, and moving ``label`` to it.

    Raises:
        InvalidArgument: ``base`` is not a folder, ``label`` without a config file (unless
            ``canary``: the rollout moves it on the server), a bad label name, or a config file
            that does not parse or has no model at ``base``.
    """
    if base.exists() and not base.is_dir():
        raise InvalidArgument(f"--promote {base}: expected a model's base path (a folder), found a file")
    version = max(list_versions(base), default=0) + 1 if base.is_dir() else 1
    notes = [] if base.is_dir() else [f"{base} does not exist yet; it is created"]
    if label is None or (canary and config_file is None):
        if label is not None:
            notes.append(
                f"label {label!r} moves on the server only (until it restarts, or for good with "
                f"--rollout_state_dir): set it in {base / SETTINGS_FILE} under [labels] to keep it"
            )
        return Promotion(base, base.name, version, label, notes=tuple(notes))
    if config_file is None:
        raise InvalidArgument(
            f"--promote-label {label}: labels are moved in the model config file; give --model_config_file "
            f"(or set the label by hand in {base / SETTINGS_FILE} under [labels])"
        )
    try:
        before = config_file.read_text()
        message = pb.ModelServerConfig()
        text_format.Parse(before, message)
        parse_model_config(before, str(config_file))  # inferd's own checks of names and labels
    except (OSError, text_format.ParseError, ConfigError) as exc:
        raise InvalidArgument(f"--model_config_file {config_file}: {exc}") from None
    entry = _entry(message, base, config_file)
    policy = entry.model_version_policy
    if policy.WhichOneof("policy_choice") == "specific":
        if version not in policy.specific.versions:
            policy.specific.versions.append(version)
            notes.append(f"version {version} is added to the specific versions before the label moves")
    elif _serves_one(entry, base):
        notes.append(
            f"model {entry.name!r} serves only its latest version: requests by label {label!r} answer "
            "404 from when the new version loads until the label moves; a policy of "
            "latest { num_versions: 2 } or all keeps them answered"
        )
    with_version = text_format.MessageToString(message)
    entry.version_labels[label] = version
    after = text_format.MessageToString(message)
    try:
        parse_model_config(after, f"--promote-label {label}")
    except ConfigError as exc:
        raise InvalidArgument(exc.message) from None
    return Promotion(
        base,
        entry.name,
        version,
        label,
        config_file,
        before,
        with_version,
        after,
        tuple(notes),
    )


def apply(
    promotion: Promotion,
    source: Path,
    wait_url: str | None = None,
    wait_timeout_s: float = 300.0,
    move_label: bool = True,
) -> None:
    """Do it: copy ``source`` (a version folder), rename, and (with a label) rewrite the config;
    without ``move_label`` (a canary), the label is left for ``finish``.

    Raises:
        InvalidArgument: the version folder appeared meanwhile (another promotion), the copy
            failed (the error; the partial copy is removed), or the config file changed since
            ``plan`` read it (its edits would be lost); nothing is done then.
        ModelLoadError: with ``wait_url``, the server reports the new version failed to load, or
            it is not AVAILABLE within ``wait_timeout_s``; the label is then not moved.
    """
    if promotion.config_file is not None and _read(promotion.config_file) != promotion.config_before:
        raise InvalidArgument(
            f"--model_config_file {promotion.config_file} changed while the candidates were measured; "
            "nothing was promoted: run inferd select again"
        )
    staging, target = promotion.staging, promotion.base / str(promotion.version)
    try:
        promotion.base.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, staging)
        if target.exists():
            raise InvalidArgument(f"{target} appeared while copying; promote again for the next number")
        staging.rename(target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # shutil.Error too: a file that could not be copied
            raise InvalidArgument(f"cannot copy {source} into {promotion.base}: {_copy_error(exc)}") from None
        raise
    if promotion.config_file is None:
        return
    if promotion.config_with_version != promotion.config_before:
        _replace(promotion.config_file, promotion.config_with_version)
    if wait_url:
        wait_until_available(wait_url, promotion.model_name, promotion.version, wait_timeout_s)
    if move_label:
        _replace(promotion.config_file, promotion.config_after)


def finish(promotion: Promotion) -> None:
    """Move the label in the config file, after a canary rollout moved it on the server.

    Raises:
        InvalidArgument: the config file changed since ``apply`` wrote it; it is left as it is.
    """
    if promotion.config_file is None or promotion.config_after == promotion.config_with_version:
        return
    if _read(promotion.config_file) != promotion.config_with_version:
        raise InvalidArgument(
            f"--model_config_file {promotion.config_file} changed during the rollout; label "
            f"{promotion.label!r} was moved on the server only: set it to {promotion.version} in the file"
        )
    _replace(promotion.config_file, promotion.config_after)


def wait_until_available(url: str, model: str, version: int, timeout_s: float) -> None:
    """Poll TF Serving's model status API at ``url`` until ``version`` is AVAILABLE.

    Raises:
        ModelLoadError: the version ended (failed to load) or the time ran out.
    """
    status_url = f"{url.rstrip('/')}/v1/models/{model}/versions/{version}"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(status_url, timeout=5) as response:
                (status,) = orjson.loads(response.read())["model_version_status"]
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            last = str(exc)
        else:
            last = status["state"]
            if last == "AVAILABLE":
                return
            if last == "END":
                raise ModelLoadError(
                    f"{model} version {version} failed to load on {url}: "
                    f"{status.get('status', {}).get('error_message', '')}; the label was not moved"
                )
        time.sleep(_POLL_S)
    raise ModelLoadError(
        f"{model} version {version} was not AVAILABLE on {url} after {timeout_s:.0f} s (last: {last}); "
        "the label was not moved"
    )


def _entry(message: pb.ModelServerConfig, base: Path, config_file: Path) -> pb.ModelConfig:
    entries = list(message.model_config_list.config)
    for entry in entries:
        if Path(entry.base_path).resolve() == base.resolve():
            return entry
    named = [e for e in entries if e.name == base.name]
    if len(named) == 1:
        return named[0]
    raise InvalidArgument(
        f"--model_config_file {config_file}: no model has base_path {base}; it lists "
        f"{[(e.name, e.base_path) for e in entries]}"
    )


def _serves_one(entry: pb.ModelConfig, base: Path) -> bool:
    if entry.HasField("model_version_policy"):
        choice = entry.model_version_policy.WhichOneof("policy_choice")
        return choice in (None, "latest") and max(entry.model_version_policy.latest.num_versions, 1) == 1
    try:
        policy = read_model_settings(base).version_policy or VersionPolicy()
    except ConfigError:
        return False
    return policy.kind == "latest" and policy.num_versions == 1


def _copy_error(exc: OSError) -> str:
    """The first file ``shutil.copytree`` could not copy, and why; else the error itself."""
    failures = exc.args[0] if isinstance(exc, shutil.Error) and exc.args else None
    if isinstance(failures, list) and failures:
        source, _, why = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return f"{source}: {why}{more}"
    return str(exc)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a new file beside it, renamed over it."""
    staging = path.with_name(f".{path.name}.inferd-{os.getpid()}")
    staging.write_text(text)
    staging.replace(path)
