"""``gac infer``: run the whole pipeline on a catalog or a BigEarthNet v2 root (see :mod:`gac.stages.infer`); writes
the caches and, unless ``--no-geotiff``, a GeoTIFF of every opt_v3 tile; with ``--scenes`` one Cloud-Optimized GeoTIFF
per scene."""

from __future__ import annotations

import argparse

from gac.cli.common import params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, help="a BigEarthNet v2 root or a GAC catalog folder")
    p.add_argument("--output-dir", default="artifacts/infer", help="where the caches go (default: %(default)s)")
    p.add_argument(
        "--stage2-checkpoint",
        help="models:/… URI or a Stage 2 model folder (default: the Stage 2 version the Stage 3 model was trained "
        "on, its registry tag gac.stage2_version; else models:/gac-stage2@champion)",
    )
    p.add_argument(
        "--stage3-checkpoint",
        default="models:/gac-stage3@champion",
        help="models:/… URI or a Stage 3 model folder (default: %(default)s)",
    )
    p.add_argument(
        "--no-geotiff",
        action="store_true",
        help="do not write <output-dir>/geotiff/<patch_id>_opt_v3.tif (by default every opt_v3 tile, with the CRS and "
        "transform of its input tile)",
    )
    p.add_argument(
        "--scenes",
        action="store_true",
        help="also write <output-dir>/scenes/<product>.tif: one Cloud-Optimized GeoTIFF per Sentinel-2 product, its "
        "opt_v3 tiles on their common grid (mean bands B01…B12, then B01_sigma…B12_sigma when the cache has σ)",
    )
    p.add_argument(
        "--save-visualizations",
        type=int,
        default=0,
        metavar="N",
        help="PNG comparisons (SAR, opt_v1, opt_v2, opt_v3, real S2) of the first N tiles in <output-dir>/figures",
    )


def run(args: argparse.Namespace) -> None:
    from gac.io import tracking
    from gac.stages import infer

    cfg = params(args)
    tracking.setup(cfg.mlflow)
    caches = infer.run(
        cfg,
        args.data_dir,
        args.output_dir,
        args.stage2_checkpoint,
        args.stage3_checkpoint,
        visualize=args.save_visualizations,
        geotiff=not args.no_geotiff,
        scenes=args.scenes,
    )
    for name, path in caches.items():
        print(f"{name}: {path}")
