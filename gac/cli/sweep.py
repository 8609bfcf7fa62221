"""``gac sweep``: multi-objective Optuna sweep (see :mod:`gac.stages.sweep`).
Start it on several machines to share a study."""

from __future__ import annotations

import argparse

from gac.cli.common import params
from gac.cli.flags import add_flags, apply, passed
from gac.pipeline import metrics_beside


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, "sweep")
    p.add_argument("--max-steps", type=int, help="optimizer steps per trial (default: the swept stage's "
                   "train.max_steps)")  # fmt: skip
    p.add_argument("--no-register", action="store_true", help="do not register the best trial")
    p.add_argument(
        "--metrics",
        help="summary JSON (default: <sweep.out>.metrics.json, beside the sweep folder; the DVC stage passes "
        "metrics/sweep.json)",
    )


def run(args: argparse.Namespace) -> None:
    from gac.stages import sweep

    cfg = apply(params(args), passed(args, "sweep"))
    metrics = args.metrics or metrics_beside(cfg.sweep.out)
    sweep.run(cfg, metrics, register=not args.no_register, max_steps=args.max_steps)
