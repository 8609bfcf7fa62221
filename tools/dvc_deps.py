"""Derive each DVC stage's code dependencies from the import graph, and write them into ``dvc.yaml``.

A stage's command is a thin ``pipelines/<stage>.py`` that calls :func:`gac.cli.main` with a subcommand; the CLI imports
the subcommand's module by name (:data:`gac.cli.COMMANDS`). From there the *import closure* — every ``gac`` module
reachable through ``import``/``from … import`` statements anywhere in a file (lazy ones inside functions too), with the
packages on the way, and modules named by a dotted string (``"gac.models.prithvi"``) — is what the stage can execute.
``python tools/dvc_deps.py --write`` puts exactly that list into every stage's ``deps`` (other deps stay), so
nobody lists modules by hand; ``tests/test_dvc_deps.py`` fails when the file and the code disagree.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gac.cli import COMMANDS  # noqa: E402

SPECS = (ROOT / "dvc.yaml", ROOT / "sweeps" / "dvc.yaml")
CLI = ROOT / "gac" / "cli" / "__init__.py"
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



def write(spec: Path) -> None:
    """Rewrite the ``gac/`` deps of every ``pipelines/`` stage in ``spec`` (comments and other deps kept)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load(spec.read_text())
    for stage in doc["stages"].values():
        if "pipelines/" not in stage["cmd"]:
            continue
        base = (spec.parent / stage.get("wdir", ".")).resolve()
        prefix = "" if base == ROOT else "../"
        kept = [d for d in stage.get("deps", []) if not str(d).startswith(prefix + "gac/")]
        code = [prefix + str(Path(f).relative_to(ROOT)) for f in closure(
            [ROOT / re.search(r"pipelines/\w+\.py", stage["cmd"]).group(0),
             module_file(COMMANDS[re.search(r"main\(\[\s*\"(\w+)\"",
                                            (ROOT / re.search(r"pipelines/\w+\.py", stage["cmd"]).group(0))
                                            .read_text()).group(1)][0])]) if "gac" in f.relative_to(ROOT).parts[:1]]
        pipelines = [d for d in kept if str(d).startswith(prefix + "pipelines/")]
        others = [d for d in kept if d not in pipelines]
        stage["deps"] = [*pipelines, *sorted(code), *others]
    with spec.open("w") as f:
        yaml.dump(doc, f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml and sweeps/dvc.yaml")
    args = parser.parse_args()
    for spec in (ROOT / "dvc.yaml", ROOT / "sweeps" / "dvc.yaml"):
        if args.write:
            write(spec)
            print(f"wrote {spec.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
