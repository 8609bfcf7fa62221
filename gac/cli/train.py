"""What ``gac stage2`` and ``gac stage3`` share: the seed's training flags and the run that trains, registers and
writes the next cache."""

from __future__ import annotations

import argparse

from gac.cli.flags import add_flags, apply, passed


def add_training_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The seed's flags and the flags made from ``train`` fields (:data:`gac.cli.flags.FLAGS`), and the run
    switches that are not params (:class:`gac.stages.trained.TrainOptions`)."""
    add_flags(p, command)
    p.add_argument("--no-register", action="store_true", help="do not register the model in MLflow")
    p.add_argument("--no-cache", action="store_true", help="do not write the next stage's cache")
    p.add_argument(
        "--cache-only",
        action="store_true",
        help="no training: write the next cache with <output-dir>/model (resumable; split across torchrun ranks)",
    )
    p.add_argument(
        "--metrics",
        help="summary JSON (default: <output-dir>.metrics.json, beside the stage's folder; the DVC stage passes "
        "metrics/<stage>.json)",
    )
    p.add_argument(
        "--plots",
        help="folder of the training curves for dvc plots, one CSV per metric (default: <output-dir>/plots; "
        "dvc.yaml passes plots/<stage>)",
    )


def params_with_flags(args: argparse.Namespace, command: str):
    """``params.yaml`` (``--params``) with the flags the user passed applied."""
    from gac.cli.common import params

    return apply(params(args), passed(args, command))


def options(args: argparse.Namespace, out: str):
    """The run switches of ``gac stage2/3`` as :class:`gac.stages.trained.TrainOptions`; the metrics go beside the
    stage's folder ``out`` unless ``--metrics`` says where."""
    from gac.pipeline import metrics_beside
    from gac.stages.trained import TrainOptions

    return TrainOptions(catalog_root=None, register=not args.no_register, write_cache=not args.no_cache,
                        cache_only=args.cache_only, metrics=str(args.metrics or metrics_beside(out)),
                        plots=args.plots)  # fmt: skip
