"""``gac stage3``: train the TerraMind cross-attention LoRA grounder on opt_v2 and write opt_v3
(see :mod:`gac.stages.stage3`)."""

from __future__ import annotations

import argparse

from gac.cli.train import add_training_arguments, options, params_with_flags
from gac.pipeline import StageName as S


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_arguments(p, S.STAGE3)
    p.add_argument("--stage2-dir", help="opt_v2 cache (default: <stage2.out>/opt_v2)")
    p.add_argument("--stage2-checkpoint", help="a Stage 2 model folder to (re)write opt_v2 from before training")
    p.add_argument("--opt-v3-dir", help="where to write opt_v3 (default: <output-dir>/opt_v3)")


def run(args: argparse.Namespace) -> None:
    from gac.stages import stage3

    cfg = params_with_flags(args, S.STAGE3)
    opt_v2 = args.stage2_dir or f"{cfg.stage2.out}/opt_v2"
    opt_v3 = args.opt_v3_dir or f"{cfg.stage3.out}/opt_v3"
    stage3.run(cfg, cfg.stage3, opt_v2, opt_v3, options(args, cfg.stage3.out), stage2_model=args.stage2_checkpoint)
