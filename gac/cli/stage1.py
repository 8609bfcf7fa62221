"""``gac stage1``: TerraMind generation of opt_v1 (see :mod:`gac.inference.generate`).
Works under ``torchrun`` as is."""

from __future__ import annotations

import argparse

from gac.cli.common import params
from gac.cli.flags import add_flags, apply, passed
from gac.pipeline import StageName as S


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, S.STAGE1)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--metrics", default="metrics/stage1.json", help="summary JSON for dvc metrics (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> None:
    from gac.stages import stage1

    cfg = apply(params(args), passed(args, S.STAGE1))
    stage1.run(cfg, cfg.stage1, cfg.catalog.out, args.metrics, progress=not args.no_progress)
