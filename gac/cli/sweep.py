"""``gac sweep``: multi-objective Optuna sweep (see :mod:`gac.mlops.sweep`).
Start it on several machines to share a study."""

from __future__ import annotations

import argparse

from gac.cli.common import params, write_json
from gac.pipeline import TRAINED


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-trials", type=int, help="total trial budget of the study (default: sweep.n_trials)")
    p.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://… (default: sweep.storage)")
    p.add_argument("--study", help="study name (default: sweep.study)")
    p.add_argument("--stage", choices=[str(s) for s in TRAINED], help="stage to tune (default: sweep.stage)")
    p.add_argument("--max-steps", type=int, help="optimizer steps per trial (default: the stage's train.max_steps)")
    p.add_argument("--no-register", action="store_true", help="do not register the best trial")
    p.add_argument("--metrics", default="metrics/sweep.json", help="summary JSON (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    from gac import config
    from gac.mlops import sweep

    cfg = params(args)
    sw = config.override(cfg.sweep, n_trials=args.n_trials, storage=args.storage, study=args.study, stage=args.stage)
    cfg = cfg.model_copy(update={"sweep": sw})
    if args.max_steps is not None:
        section = getattr(cfg, sw.stage)
        train = config.override(section.train, max_steps=args.max_steps)
        cfg = cfg.model_copy(update={sw.stage: config.override(section, train=train.model_dump())})
    summary = sweep.run(cfg, register=not args.no_register)
    write_json(args.metrics, summary)
    print(
        f"Sweep {sw.study}: {summary['trials']} trials ({summary['complete']} complete, {summary['failed']} failed), "
        f"Pareto front of {summary['pareto']}; best trial {summary.get('best_trial')}: {summary.get('best')}"
    )
