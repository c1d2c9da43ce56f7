"""Whether a promoted version would serve the same API as the version it replaces.

Clients of a model depend on more than its answers: on its signature names, each signature's
input and output names, dtypes and shapes, and on the form of TF Serving's ``:predict`` answer,
which is the bare values for a signature with one output and an object per row (keyed by output
name) for one with several. ``api_changes`` lists every such difference between the version
being served (the base path's latest) and a candidate, each as one line of text; any difference
changes what clients receive, so ``inferd select --promote --apply`` refuses it unless told to
allow it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from inferd.config import ModelSettings
from inferd.errors import InferdError, InvalidArgument
from inferd.repository import in_process_settings, list_versions
from inferd.runtimes import load_model
from inferd.types import Signature, TensorSpec

log = logging.getLogger(__name__)


def served_version(base: Path) -> Path | None:
    """The version folder served by default at ``base`` (its highest number), or None."""
    versions = list_versions(base) if base.is_dir() else {}
    return versions[max(versions)] if versions else None


def signatures_of(version_dir: Path, settings: ModelSettings) -> Mapping[str, Signature]:
    """Load ``version_dir`` with inferd's runtime, read its signatures, close it.

    Raises:
        InvalidArgument: the version does not load (named, with the runtime's message).
    """
    try:
        model, _ = load_model(version_dir, settings, None)
    except InferdError as exc:
        raise InvalidArgument(f"cannot compare APIs: {version_dir} does not load: {exc.message}") from None
    try:
        return dict(model.signatures)
    finally:
        model.close()


def api_changes(base: Path, candidate: Path, candidate_settings: ModelSettings) -> list[str]:
    """Every difference between the API of ``base``'s served version and ``candidate``'s, as
    lines of text; empty when they match, or when ``base`` serves nothing: no version yet, or one
    that does not load (a warning says so; a promotion may be what repairs it).

    Raises:
        InvalidArgument: the candidate does not load.
    """
    served = served_version(base)
    if served is None:
        return []
    try:
        before = signatures_of(served, in_process_settings(base))
    except InferdError as exc:
        log.warning("the served API is not compared: %s", exc.message)
        return []
    after = signatures_of(candidate, candidate_settings)
    return compare(before, after)


def compare(before: Mapping[str, Signature], after: Mapping[str, Signature]) -> list[str]:
    """The differences from ``before`` to ``after``: signatures removed or added, and within a
    signature its method, inputs, outputs and ``:predict`` answer form."""
    changes = [f"signature {name!r} is removed" for name in before if name not in after]
    changes += [f"signature {name!r} is added" for name in after if name not in before]
    for name in (n for n in before if n in after):
        old, new = before[name], after[name]
        where = f"signature {name!r}"
        if old.method != new.method:
            changes.append(f"{where}: method {old.method.value} -> {new.method.value}")
        changes += _tensors(f"{where}: input", old.inputs, new.inputs)
        changes += _tensors(f"{where}: output", old.outputs, new.outputs)
        if (len(old.outputs) == 1) != (len(new.outputs) == 1):
            changes.append(f"{where}: :predict answers {_form(old)} -> {_form(new)}")
    return changes


def _tensors(where: str, old: tuple[TensorSpec, ...], new: tuple[TensorSpec, ...]) -> list[str]:
    before, after = {s.name: s for s in old}, {s.name: s for s in new}
    changes = [f"{where} {n!r} ({s.describe()}) is removed" for n, s in before.items() if n not in after]
    changes += [f"{where} {n!r} ({s.describe()}) is added" for n, s in after.items() if n not in before]
    changes += [
        f"{where} {n!r}: {s.describe()} -> {after[n].describe()}"
        for n, s in before.items()
        if n in after and s.describe() != after[n].describe()
    ]
    return changes


def _form(signature: Signature) -> str:
    if len(signature.outputs) == 1:
        return f"one output ({signature.outputs[0].name!r}: the bare values)"
    names = [s.name for s in signature.outputs]
    return f"{len(names)} outputs ({names}: an object per row)"
