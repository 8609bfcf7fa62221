"""``dvc.yaml`` lists every module a stage runs: a change to any of them reruns the stage (and only those stages).

``python tools/dvc_deps.py --write`` writes the lists; this test re-derives them and fails when they disagree.

Each stage's command is a thin ``pipelines/<stage>.py`` that calls :func:`gac.cli.main` with a subcommand; the CLI
imports the subcommand's module by name (:data:`gac.cli.COMMANDS`). From there the *import closure* — every ``gac``
module reachable through ``import``/``from … import`` statements anywhere in a file, including the lazy ones inside
functions (that is where GAC imports its heavy modules) — is what the stage can execute. Modules imported by a dotted
name in a string (``"gac.models.prithvi"``) count too. The test derives it from the source with :mod:`ast` and checks
each file is a dependency of the stage, itself or through a listed folder.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from gac.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.dvc_deps import closure, module_file  # noqa: E402  (the derivation `--write` uses)

SPECS = (ROOT / "dvc.yaml", ROOT / "sweeps" / "dvc.yaml")


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
    found = {str(f.relative_to(ROOT)) for f in closure([module_file("gac.cli.stage2")])}
    assert {"gac/cli/train.py", "gac/training/fit.py", "gac/models/prithvi.py", "gac/__init__.py"} <= found


@pytest.mark.parametrize(("spec", "name", "stage"), stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_only_the_entry_point_names_the_tracked_metrics_file(spec: str, name: str, stage: dict) -> None:
    """The DVC entry point passes ``--metrics`` = the stage's ``metrics`` in dvc.yaml; the command's own default is
    beside its output folder, never ``metrics/…`` (a run on another root must not write over the tracked figures)."""
    from gac.cli import build_parser

    entry = ROOT / re.search(r"pipelines/\w+\.py", stage["cmd"]).group(0)
    (tracked,) = [next(iter(m)) if isinstance(m, dict) else m for m in stage["metrics"]]
    assert re.search(rf'main\(\[\s*"{name}", "--metrics", "{tracked}"', entry.read_text()), entry
    args = build_parser().parse_args([name])
    assert args.metrics is None, f"gac {name} --metrics defaults to {args.metrics!r}"


#: command → (the stage module its CLI runs, how the metrics path is read off that call's arguments, where it must go
#: without --metrics given ``--output-dir <tmp>/out``; ``None``: no file).
ROUTES = {
    "catalog": ("gac.stages.catalog", "run", lambda a, k: a[1], "out"),
    "stage1": ("gac.stages.stage1", "run", lambda a, k: a[3], "out"),
    "stage2": ("gac.stages.stage2", "run", lambda a, k: a[4].metrics, "out"),
    "stage3": ("gac.stages.stage3", "run", lambda a, k: a[4].metrics, "out"),
    "evaluate": ("gac.stages.evaluate", "run_pipeline", lambda a, k: a[1], "out"),
    "sweep": ("gac.stages.sweep", "run", lambda a, k: a[1], "artifacts/sweep"),
    "promote": ("gac.stages.promote", "run", lambda a, k: a[1], None),
}


@pytest.mark.parametrize("command", sorted(ROUTES))
def test_a_command_without_metrics_writes_them_beside_its_output_folder(command, monkeypatch, tmp_path) -> None:
    """What each ``gac`` command hands its stage as the metrics file when ``--metrics`` is not given:
    ``<out>.metrics.json`` beside its output folder, never ``metrics/…`` (``gac promote``: none). The stage is not
    run."""
    import importlib

    from gac.cli import main
    from gac.pipeline import metrics_beside

    module, name, metrics_of, out = ROUTES[command]
    seen = []
    monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **k: seen.append(metrics_of(a, k)))
    monkeypatch.chdir(tmp_path)
    args = [] if out in (None, "artifacts/sweep") else ["--output-dir", str(tmp_path / out)]
    assert main(["--params", str(ROOT / "params.yaml"), command, *args]) == 0
    expected = None if out is None else metrics_beside(tmp_path / out if args else out)
    assert [None if m is None else Path(m) for m in seen] == [expected]
