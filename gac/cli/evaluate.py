"""``gac evaluate``: the ablation over a split, with pictures, GeoTIFFs and registry tags (see
:mod:`gac.stages.evaluate`).

With ``--data-dir ROOT`` it scores the trained pipeline on another BigEarthNet v2 root instead, into a folder of its
own and never into the DVC pipeline's outputs (see :mod:`gac.stages.external`).
"""

from __future__ import annotations

import argparse

from gac.cli.common import params
from gac.pipeline import metrics_beside

#: Flags that only mean something with ``--data-dir``.
EXTERNAL_ONLY = ("stage2_checkpoint", "stage3_checkpoint", "max_tiles", "baseline_catalog")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        help="score the trained pipeline on this BigEarthNet v2 root (another region or year) instead of the DVC "
        "pipeline's own caches; writes only into --output-dir",
    )
    p.add_argument(
        "--split",
        choices=["train", "validation", "test"],
        help="split to score (default: evaluate.split; with --data-dir: test, else validation, else train, the first "
        "the root has)",
    )
    p.add_argument(
        "--output-dir",
        help="plots, figures and GeoTIFFs folder, replaced (default: evaluate.out); with --data-dir: the run's "
        "folder, holding caches/, evaluate/ (replaced) and evaluate.json (default: "
        "artifacts/evaluate-external/<root folder name>)",
    )
    p.add_argument(
        "--metrics",
        help="headline metrics JSON (default: <output-dir>.metrics.json, beside the report folder, the DVC stage "
        "passes metrics/evaluate.json; with --data-dir: <output-dir>/evaluate.json); every figure goes to "
        "details.json in the output folder",
    )
    p.add_argument(
        "--stage2-checkpoint",
        help="with --data-dir: models:/… URI or Stage 2 model folder (default: <stage2.out>/model, the pipeline's)",
    )
    p.add_argument(
        "--stage3-checkpoint",
        help="with --data-dir: models:/… URI or Stage 3 model folder (default: <stage3.out>/model, the pipeline's)",
    )
    p.add_argument(
        "--max-tiles",
        type=int,
        help="with --data-dir: score at most N tiles of the split, the first in metadata order (default: all)",
    )
    p.add_argument(
        "--baseline-catalog",
        help="with --data-dir: catalog whose train split the ridge baseline is fitted on (default: catalog.out, the "
        "tiles the models were trained on)",
    )


def run(args: argparse.Namespace) -> None:
    from gac import config
    from gac.errors import GacError

    cfg = params(args)
    if args.data_dir is not None:
        from gac.stages.external import evaluate_root

        evaluate_root(cfg, args.data_dir, out=args.output_dir, stage2=args.stage2_checkpoint,
                      stage3=args.stage3_checkpoint, split=args.split, max_tiles=args.max_tiles,
                      metrics_path=args.metrics, baseline_catalog=args.baseline_catalog)  # fmt: skip
        return
    for name in EXTERNAL_ONLY:
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise GacError(f"{flag} needs --data-dir (without it gac evaluate scores the DVC pipeline's own caches)")
    from gac.stages import evaluate

    section = config.override(cfg.evaluate, split=args.split, out=args.output_dir)
    metrics = args.metrics or metrics_beside(section.out)
    evaluate.run_pipeline(cfg.model_copy(update={"evaluate": section}), metrics)
