"""``gac stage2``: train the Prithvi LoRA refiner on opt_v1 and write opt_v2 (see :mod:`gac.stages.stage2`)."""

from __future__ import annotations

import argparse

from gac.cli.train import add_training_arguments, options, params_with_flags
from gac.pipeline import StageName as S


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_arguments(p, S.STAGE2)
    p.add_argument("--opt-v2-dir", help="where to write opt_v2 (default: <output-dir>/opt_v2)")


def run(args: argparse.Namespace) -> None:
    from gac.stages import stage2

    cfg = params_with_flags(args, S.STAGE2)
    opt_v2 = args.opt_v2_dir or f"{cfg.stage2.out}/opt_v2"
    stage2.run(cfg, cfg.stage2, cfg.stage1.out, opt_v2, options(args, cfg.stage2.out))
