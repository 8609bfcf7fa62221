"""``gac stage3``: train the TerraMind cross-attention LoRA grounder on opt_v2 and write opt_v3."""

from __future__ import annotations

import argparse

from gac.cli.train import add_training_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_arguments(p)
    p.add_argument("--stage2-dir", help="opt_v2 cache (default: <stage2.out>/opt_v2)")
    p.add_argument("--stage2-checkpoint", help="a Stage 2 model folder to (re)write opt_v2 from before training")
    p.add_argument(
        "--lora-cross-attention-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LoRA on the decoder's cross-attention only (the design; --no-… uses lora.target_modules)",
    )
    p.add_argument("--opt-v3-dir", help="where to write opt_v3 (default: <output-dir>/opt_v3)")


def section_for(cfg, args: argparse.Namespace):
    """``cfg.stage3`` with the flags applied; LoRA targets the decoder's cross-attention unless
    ``--no-lora-cross-attention-only`` (then ``stage3.lora.target_modules`` from the params file decides)."""
    from gac import config
    from gac.cli.train import section_with_overrides

    section = section_with_overrides(cfg.stage3, args)
    if args.lora_cross_attention_only:
        design = config.Stage3Params().lora.target_modules
        section = config.override(section, lora=config.override(section.lora, target_modules=design).model_dump())
    return section


def run(args: argparse.Namespace) -> None:
    from gac.cli.common import params
    from gac.cli.train import options
    from gac.stages import stage3

    cfg = params(args)
    section = section_for(cfg, args)
    stage3.run(cfg, section, args.stage2_dir or f"{cfg.stage2.out}/opt_v2", args.opt_v3_dir or f"{section.out}/opt_v3",
               options(args), stage2_model=args.stage2_checkpoint)  # fmt: skip
