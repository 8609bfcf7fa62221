"""``gac stage1``: TerraMind generation of opt_v1 (see :mod:`gac.inference.generate`).
Works under ``torchrun`` as is."""

from __future__ import annotations

import argparse

from gac.cli.common import params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="the tile catalog folder (default: catalog.out)")
    p.add_argument("--output-dir", help="opt_v1 cache folder (default: stage1.out)")
    p.add_argument("--batch-size", type=int, help="tiles per forward pass (default: stage1.batch_size)")
    p.add_argument("--timesteps", type=int, help="diffusion decoding steps (default: stage1.timesteps)")
    p.add_argument("--max-tiles", type=int, help="first N catalog tiles only (default: stage1.max_tiles)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: stage1.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--metrics", default="metrics/stage1.json", help="summary JSON for dvc metrics (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> None:
    from gac import config
    from gac.stages import stage1

    cfg = params(args)
    section = config.override(
        cfg.stage1,
        out=args.output_dir,
        batch_size=args.batch_size,
        timesteps=args.timesteps,
        max_tiles=args.max_tiles,
        device=args.device,
    )
    stage1.run(cfg, section, args.data_dir or cfg.catalog.out, args.metrics, progress=not args.no_progress)
