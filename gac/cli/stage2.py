"""``gac stage2``: train the Prithvi LoRA refiner on opt_v1 and write opt_v2 (see :mod:`gac.training.stage2`)."""

from __future__ import annotations

import argparse

from gac.cli.train import add_training_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_arguments(p)
    p.add_argument("--stage1-dir", help="opt_v1 cache (default: stage1.out)")
    p.add_argument(
        "--load-in-8bit", action=argparse.BooleanOptionalAction, default=None, help="int8 frozen base (bitsandbytes)"
    )
    p.add_argument("--opt-v2-dir", help="where to write opt_v2 (default: <output-dir>/opt_v2)")


def run(args: argparse.Namespace) -> None:
    from gac.cli.common import params
    from gac.cli.train import options, section_with_overrides
    from gac.stages import stage2

    cfg = params(args)
    section = section_with_overrides(cfg.stage2, args, load_in_8bit=args.load_in_8bit)
    stage2.run(cfg, section, args.stage1_dir or cfg.stage1.out, args.opt_v2_dir or f"{section.out}/opt_v2",
               options(args))  # fmt: skip
