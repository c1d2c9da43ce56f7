"""What ``inferd select`` compares: candidate paths resolved to one loadable version each.

A candidate path is one of:

- a folder holding ``variants.json`` (``inferd optimize --out``): each variant that was made
  (``"ok": true``) becomes a candidate named after the variant;
- a model base path (numbered version folders inside): its latest version, named after the folder,
  with the base path's ``inferd.toml`` - the resolver of ``inferd batch``;
- a numbered version folder: that version, with its parent's ``inferd.toml``, named ``parent/N``;
- any other folder: a version folder on its own (a variant), with an ``inferd.toml`` inside it if
  there is one, named after the folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from inferd.errors import ConfigError, InvalidArgument, ModelLoadError
from inferd.repository import (
    ModelPlan,
    VersionSource,
    fingerprint,
    in_process_settings,
    list_versions,
    resolve_version,
)

VARIANTS_FILE = "variants.json"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model version to measure: its report name, its folder and how to load it."""

    name: str
    path: Path
    """The version folder: what is measured, sized and promoted."""
    plan: ModelPlan


def resolve(paths: Sequence[Path]) -> list[Candidate]:
    """Every candidate the paths name, in order, with names made unique (``name#2``).

    Raises:
        InvalidArgument: a path that does not exist, a ``variants.json`` that does not parse, a
            model folder with no version, or an ``inferd.toml`` that does not parse (named).
    """
    found: list[Candidate] = []
    for path in paths:
        found.extend(_expand(path))
    if not found:
        raise InvalidArgument("no candidates: every variants.json lists only failed variants")
    seen: dict[str, int] = {}
    unique = []
    for candidate in found:
        seen[candidate.name] = seen.get(candidate.name, 0) + 1
        if seen[candidate.name] > 1:
            candidate = dataclasses.replace(candidate, name=f"{candidate.name}#{seen[candidate.name]}")
        unique.append(candidate)
    return unique


def _expand(path: Path) -> list[Candidate]:
    if not path.is_dir():
        raise InvalidArgument(f"candidate {path}: expected a model, version or variants folder")
    listing = path / VARIANTS_FILE
    if listing.is_file():
        return _variants(listing)
    if list_versions(path) or path.name.isdigit():
        try:
            plan = resolve_version(path)
        except (ModelLoadError, ConfigError) as exc:
            raise InvalidArgument(f"candidate {path}: {exc.message}") from None
        ((number, source),) = plan.aspired.items()
        name = plan.name if list_versions(path) else f"{plan.name}/{number}"
        return [Candidate(name, source.path, dataclasses.replace(plan, name=_model_name(name)))]
    return [_version_folder(path, path.name)]


def _variants(listing: Path) -> list[Candidate]:
    try:
        entries = orjson.loads(listing.read_bytes())
        if not isinstance(entries, list):
            raise TypeError(f"a list of variants, got {type(entries).__name__}")
        made = [(str(e["name"]), Path(str(e["path"]))) for e in entries if e.get("ok")]
    except (OSError, orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidArgument(
            f"{listing}: expected a JSON list of {{name, path, ok, error}}: {type(exc).__name__}: {exc}"
        ) from None
    return [_version_folder(p if p.is_absolute() else listing.parent / p, name) for name, p in made]


def _version_folder(path: Path, name: str) -> Candidate:
    if not path.is_dir():
        raise InvalidArgument(f"candidate {name}: {path} is not a folder")
    try:
        settings = in_process_settings(path)
    except ConfigError as exc:
        raise InvalidArgument(f"candidate {name}: {exc.message}") from None
    source = VersionSource(1, path, fingerprint(path))
    plan = ModelPlan(_model_name(name), {1: source}, settings=settings)
    return Candidate(name, path, plan)


def _model_name(name: str) -> str:
    """A name the manager takes: candidates are loaded one per process, so any fixed text works,
    but keeping the candidate's name makes log lines say which one they are about."""
    return name.replace("/", "_")
