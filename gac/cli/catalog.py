"""``gac catalog``: the first DVC stage (see :mod:`gac.stages.catalog`)."""

from __future__ import annotations

import argparse

from gac.cli.common import params
from gac.cli.flags import add_flags, apply, passed
from gac.pipeline import StageName as S
from gac.pipeline import metrics_beside


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, S.CATALOG)
    p.add_argument(
        "--metrics",
        help="summary JSON (default: <output-dir>.metrics.json, beside the catalog folder; the DVC stage passes "
        "metrics/catalog.json)",
    )


def run(args: argparse.Namespace) -> None:
    from gac.stages import catalog

    cfg = apply(params(args), passed(args, S.CATALOG))
    catalog.run(cfg, args.metrics or metrics_beside(cfg.catalog.out))
