"""``dvc.yaml`` lists every module a stage runs: a change to any of them reruns the stage (and only those stages).

Each stage's command is a thin ``pipelines/<stage>.py`` that calls :func:`gac.cli.main` with a subcommand; the CLI
imports the subcommand's module by name (:data:`gac.cli.COMMANDS`). From there the *import closure* — every ``gac``
module reachable through ``import``/``from … import`` statements anywhere in a file, including the lazy ones inside
functions (that is where GAC imports its heavy modules) — is what the stage can execute. Modules imported by a dotted
name in a string (``"gac.models.prithvi"``) count too. The test derives it from the source with :mod:`ast` and checks
each file is a dependency of the stage, itself or through a listed folder.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from gac.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SPECS = (ROOT / "dvc.yaml", ROOT / "sweeps" / "dvc.yaml")
CLI = ROOT / "gac" / "cli.py"
DOTTED = re.compile(r"gac(\.\w+)+")


def module_file(name: str) -> Path | None:
    """The source file of a ``gac`` module name, or ``None`` if it is not one (e.g. a function imported by name)."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every ``gac`` module a file imports, at any depth of the file (lazy imports included), and the dotted
    ``"gac.…"`` strings it names (imported by name, e.g. the stage table of :mod:`gac.training.export`) — except in
    the CLI, whose command table the test follows for the stage's own command only."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and path != CLI:
            if DOTTED.fullmatch(node.value):
                names.add(node.value)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "gac"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "gac":
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from gac import metrics`
    return names


def closure(start: list[Path]) -> set[Path]:
    """Files reachable from ``start`` through ``gac`` imports, with the packages (``__init__.py``) on the way."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing gac.a.b runs gac/__init__.py and gac/a/__init__.py
                found = module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def stages() -> list[tuple[str, str, dict]]:
    """``(dvc.yaml, stage name, stage)`` of every stage whose command runs a ``pipelines/`` entry point."""
    out = []
    for spec in SPECS:
        for name, stage in yaml.safe_load(spec.read_text())["stages"].items():
            if "pipelines/" in stage["cmd"]:
                out.append((str(spec.relative_to(ROOT)), name, stage))
    return out


@pytest.mark.parametrize(("spec", "name", "stage"), stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_module_a_stage_runs_is_one_of_its_dependencies(spec: str, name: str, stage: dict) -> None:
    entry = ROOT / re.search(r"pipelines/\w+\.py", stage["cmd"]).group(0)
    command = re.search(r"main\(\[\s*\"(\w+)\"", entry.read_text())
    assert command, f'{entry}: expected a thin entry point calling gac.cli.main(["<command>", …])'
    start = [entry, module_file(COMMANDS[command.group(1)][0])]
    base = (ROOT / spec).parent / stage.get("wdir", ".")
    deps = [(base / d).resolve() for d in stage.get("deps", [])]
    missing = sorted(
        str(f.relative_to(ROOT)) for f in closure(start) if not any(f == d or d in f.parents for d in deps)
    )
    assert not missing, f"{spec} stage {name!r} runs these modules but does not depend on them: {missing}"


def test_the_closure_follows_lazy_imports() -> None:
    """The derivation itself: a lazy import inside a function counts, and so do the packages it passes through."""
    found = {str(f.relative_to(ROOT)) for f in closure([module_file("gac.commands.stage2")])}
    assert {"gac/commands/train.py", "gac/training/fit.py", "gac/models/prithvi.py", "gac/__init__.py"} <= found
