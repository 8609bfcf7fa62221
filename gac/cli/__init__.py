"""The ``gac`` command: one subcommand per stage, each a thin shell over its :mod:`gac` module.

Only :mod:`argparse` is imported up front; a subcommand imports torch, TerraTorch or MLflow when it runs, so
``gac --help`` is instant. Flags override ``params.yaml`` through :func:`gac.config.override`; they never re-parse it.
Bad input (:class:`~gac.errors.GacError`) is printed as one line, ``gac: error: …``, with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from importlib.util import find_spec

from gac.errors import GacError
from gac.pipeline import StageName as S
from gac.startup import quiet_gc

#: subcommand → (module with ``add_arguments(parser)`` and ``run(args)``, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("gac.cli.sample", "materialise the embedded BigEarthNet v2 sample (real reBEN tiles) into data/"),
    "synth": ("gac.cli.synth", "write seeded synthetic tiles in the BigEarthNet v2 layout (tests, benchmarks)"),
    "catalog": ("gac.cli.catalog", "validate, resample and pack BigEarthNet v2 tiles into the tile catalog"),
    S.STAGE1: ("gac.cli.stage1", "Stage 1: TerraMind S1→S2 generation into the opt_v1 cache"),
    S.STAGE2: ("gac.cli.stage2", "Stage 2: train Prithvi-EO + LoRA refinement (opt_v1 → opt_v2)"),
    S.STAGE3: ("gac.cli.stage3", "Stage 3: train TerraMind cross-attention LoRA grounding (opt_v2 → opt_v3)"),
    "evaluate": ("gac.cli.evaluate", "metrics, ablation, pictures and GeoTIFFs over a split"),
    "infer": ("gac.cli.infer", "run the whole pipeline on a catalog or BigEarthNet root"),
    "promote": ("gac.cli.promote", "move the 'champion' alias when a challenger beats it and meets the targets"),
    "sweep": ("gac.cli.sweep", "multi-objective Optuna sweep of LoRA rank, learning rate and loss weights"),
}


def _available() -> dict[str, tuple[str, str]]:
    """Subcommands whose module exists (looked up without importing it)."""
    return {name: spec for name, spec in COMMANDS.items() if find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each subcommand module adds its own flags (modules import nothing heavy at top level)."""
    parser = argparse.ArgumentParser(prog="gac", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gac`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with quiet_gc():  # the stage's imports (torch, Lightning, MLflow…) at start-up: see gac.startup
        run: Callable[[argparse.Namespace], int | None] = importlib.import_module(args._module).run
        if find_spec(stage := f"gac.stages.{args.command}") is not None:
            importlib.import_module(stage)
    try:
        return int(run(args) or 0)
    except GacError as e:
        print(f"gac: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in STORAGE_ERRORS:
            raise
        # Finished shards stay (atomic writes); the one in flight left only a .tmp- folder the rerun removes.
        where = f"{e.filename}: " if e.filename else ""
        print(f"gac: error: {where}{os.strerror(e.errno)}; fix the storage and rerun (finished work is kept)",
              file=sys.stderr)  # fmt: skip
        return 1


#: Storage failures a user fixes outside GAC (full disk, quota, read-only or forbidden folder): one line, no traceback.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


if __name__ == "__main__":
    sys.exit(main())
