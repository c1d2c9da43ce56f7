"""The first steps in README.md, docs/tfserving-tutorial.md and scripts/demo work as written in
a new shell: every ``inferd`` or ``python`` command runs from the checkout's ``.venv/`` (by its
path, or after the page says to activate it), and the tutorial installs what its example imports."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
ACTIVATE = "source .venv/bin/activate"


def commands(path: Path) -> list[str]:
    """The shell lines a reader pastes: fenced code blocks of a page (without a language, or
    ``sh``/``bash``), the indented commands a script prints."""
    text = path.read_text()
    if path.suffix == ".md":
        blocks = re.findall(r"^```(?:sh|bash|console)?\n(.*?)^```", text, flags=re.M | re.S)
        return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    return [line.strip() for line in text.splitlines() if line.startswith("  ")]


@pytest.mark.parametrize("page", ["README.md", "docs/tfserving-tutorial.md", "scripts/demo"])
def test_commands_run_from_the_venv_or_after_activating_it(page: str) -> None:
    activated = False
    for line in commands(ROOT / page):
        activated = activated or line == ACTIVATE
        word = line.split()[0]
        if word in ("inferd", "python", "python3", "pip"):
            assert activated, f"{page}: {line!r} needs .venv/bin/ or {ACTIVATE!r} before it"


def requirements(extra: str) -> set[str]:
    """Distributions the checkout's ``inferd[extra]`` installs, with everything they require
    (read from the installed packages' metadata)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    extras, seen = [extra], set()
    while extras:
        for text in project["optional-dependencies"][extras.pop()]:
            requirement = Requirement(text)
            if requirement.name == "inferd":
                extras += list(requirement.extras)
            else:
                wanted.append(requirement)
    while wanted:
        requirement = wanted.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(requirement.name) or []:
            nested = Requirement(text)
            if nested.marker is None or nested.marker.evaluate({"extra": ""}):
                wanted.append(nested)
    return seen


def test_the_tutorial_sets_up_the_extra_its_example_imports() -> None:
    page = ROOT / "docs" / "tfserving-tutorial.md"
    (setup,) = [line for line in commands(page) if line.startswith("bash scripts/setup ")]
    (run,) = [line for line in commands(page) if "examples/tfserving_digits" in line]
    assert run.startswith(".venv/bin/python ")  # the environment scripts/setup made
    installed = requirements(setup.split()[-1])
    tree = ast.parse((ROOT / run.split()[1]).read_text())
    imported = {
        node.names[0].name.split(".")[0] if isinstance(node, ast.Import) else str(node.module).split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "level", 0) == 0
    }
    providers = metadata.packages_distributions()
    for module in sorted(imported):
        if module in providers:  # third-party, not the standard library
            names = {d.lower().replace("_", "-") for d in providers[module]}
            assert names & installed, f"the example imports {module}, which {setup!r} does not install"
