"""``gac evaluate``: the ablation over a split, with pictures, GeoTIFFs and registry tags (see :mod:`gac.evaluate`)."""

from __future__ import annotations

import argparse

from gac.commands import params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=["train", "validation", "test"], help="split to score (default: evaluate.split)")
    p.add_argument("--output-dir", help="plots, figures and GeoTIFFs folder, replaced (default: evaluate.out)")
    p.add_argument("--metrics", default="metrics/evaluate.json", help="metrics JSON for dvc (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    from gac import config
    from gac.evaluate import evaluate

    cfg = params(args)
    section = config.override(cfg.evaluate, split=args.split, out=args.output_dir)
    evaluate(cfg.model_copy(update={"evaluate": section}), section.out, metrics_path=args.metrics)
