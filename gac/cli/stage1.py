"""``gac stage1``: TerraMind generation of opt_v1 (see :mod:`gac.inference.generate`).
Works under ``torchrun`` as is."""

from __future__ import annotations

import argparse

from gac.cli.common import params
from gac.cli.flags import add_flags, apply, passed
from gac.pipeline import StageName as S
from gac.pipeline import metrics_beside


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, S.STAGE1)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--metrics",
        help="summary JSON (default: <output-dir>.metrics.json, beside the opt_v1 folder; the DVC stage passes "
        "metrics/stage1.json)",
    )


def run(args: argparse.Namespace) -> None:
    from gac.stages import stage1

    cfg = apply(params(args), passed(args, S.STAGE1))
    metrics = args.metrics or metrics_beside(cfg.stage1.out)
    stage1.run(cfg, cfg.stage1, cfg.catalog.out, metrics, progress=not args.no_progress)
