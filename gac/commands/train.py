"""What ``gac stage2`` and ``gac stage3`` share: the seed's training flags and the run that trains, registers and
writes the next cache."""

from __future__ import annotations

import argparse

#: The last validation's figures that ``metrics/<stage>.json`` holds besides the step, scores and sizes: ``dvc metrics
#: show`` prints one column per key of every metrics file, so the loss terms stay in the curves' log
#: (``<out>/logs/metrics.csv``) and the MLflow run.
SUMMARY_METRICS = ("val/loss", "val/psnr", "val/ssim", "val/sam_deg", "val/sar_edge", "val/selection")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The seed's flags; each overrides its ``params.yaml`` key."""
    p.add_argument("--data-dir", help="tile catalog folder (default: catalog.out)")
    p.add_argument("--output-dir", help="checkpoints, model and logs (default: <stage>.out)")
    p.add_argument("--max-tiles", type=int, help="at most N train and N validation tiles")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--val-every", type=int, help="validate every N optimizer steps")
    p.add_argument("--save-every", type=int, help="write last.ckpt every N optimizer steps")
    p.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--early-stopping-patience", type=int)
    p.add_argument("--devices", help="Lightning devices (int or 'auto')")
    p.add_argument("--strategy", help="Lightning strategy, e.g. ddp")
    p.add_argument("--accelerator", help="cpu | gpu | auto")
    p.add_argument("--no-register", action="store_true", help="do not register the model in MLflow")
    p.add_argument("--no-cache", action="store_true", help="do not write the next stage's cache")
    p.add_argument(
        "--cache-only",
        action="store_true",
        help="no training: write the next cache with <output-dir>/model (resumable; split across torchrun ranks)",
    )
    p.add_argument("--metrics", help="summary JSON for dvc metrics (default: metrics/<stage>.json)")
    p.add_argument(
        "--plots",
        help="folder of the training curves for dvc plots, one CSV per metric (default: <output-dir>/plots; "
        "dvc.yaml passes plots/<stage>)",
    )


def section_with_overrides(section, args: argparse.Namespace, **extra):
    """``section`` with the training flags (and ``extra`` top-level changes) applied."""
    from gac import config

    devices = int(args.devices) if args.devices and args.devices.isdigit() else args.devices
    train = config.override(
        section.train,
        batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum_steps,
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_tiles=args.max_tiles,
        val_every_n_steps=args.val_every,
        save_every_n_steps=args.save_every,
        early_stopping=args.early_stopping,
        patience=args.early_stopping_patience,
        devices=devices,
        strategy=args.strategy,
        accelerator=args.accelerator,
    )
    lora = config.override(section.lora, rank=args.lora_rank)
    return config.override(section, train=train.model_dump(), lora=lora.model_dump(), out=args.output_dir, **extra)


def run_stage(stage: str, args: argparse.Namespace, section, source_root: str, next_cache: str) -> None:
    """Train, register, write the next cache and the DVC metrics of one stage (holding ``<out>``'s lock)."""
    from gac.lock import exclusive_first_rank

    with exclusive_first_rank(section.out):
        _run_stage(stage, args, section, source_root, next_cache)


def _run_stage(stage: str, args: argparse.Namespace, section, source_root: str, next_cache: str) -> None:
    from pathlib import Path

    from gac import engine, tracking
    from gac.commands import params, write_json
    from gac.provenance import lineage
    from gac.refine import write_cache
    from gac.training.export import load_model
    from gac.training.fit import fit

    cfg = params(args)
    catalog_root = args.data_dir or cfg.catalog.out
    device = engine.resolve_device(section.cache.device)
    if args.cache_only:
        model_dir = Path(section.out) / "model"
        _, _, model = load_model(model_dir, device)
        model, crossfit = _with_folds(model, _cross_fit(stage, section, catalog_root, source_root, cfg, False), device)
        info = write_cache(stage, model, catalog_root, source_root, next_cache, section.cache,
                           provenance={"model_dir": str(model_dir), "data_source": cfg.data.source,
                                       **crossfit})  # fmt: skip
        if engine.dist()[0] == 0:
            print(f"{stage}: wrote {next_cache} ({info['tiles']} tiles, {info['errors']} errors) with {model_dir}")
        return
    upstream = lineage(stage, catalog_root, source_root)
    result = fit(
        stage,
        section,
        cfg.mlflow,
        catalog_root,
        source_root,
        tags={"gac.data": cfg.data.source, **upstream},
        register=not args.no_register,
        exclude=cfg.data.exclude,
    )
    # every rank takes part in the fold trainings (DDP); rank 0 gets the models
    folds = None if args.no_cache else _cross_fit(stage, section, catalog_root, source_root, cfg, train=True)
    if result is None:  # a non-zero DDP rank: rank 0 does the rest
        return
    summary = {
        "best_score": result.best_score,
        "global_step": result.global_step,
        **{k: v for k, v in result.metrics.items() if k in SUMMARY_METRICS or k == "registered_version"},
        "trainable_params": result.trainable["trainable"],
        "trainable_share": result.trainable["share"],
    }
    if not args.no_cache:
        _, _, model = load_model(result.model_dir, device)
        model, crossfit = _with_folds(model, folds, device)
        version = result.metrics.get("registered_version")
        from gac.registry import MODEL_NAMES

        info = write_cache(
            stage,
            model,
            catalog_root,
            source_root,
            next_cache,
            section.cache,
            provenance={
                "weights_origin": tracking.weights_origin(section.pretrained, section.ckpt_path),
                "registered_model": MODEL_NAMES[stage] if not args.no_register else None,
                "version": str(version) if version else None,
                "model_dir": result.model_dir,
                "data_source": cfg.data.source,
                "lineage": upstream,
                **crossfit,
            },
            distributed=False,  # the other DDP ranks have ended: rank 0 writes every shard
        )
        summary["seconds_per_tile"] = info["seconds_per_tile"]
    write_json(args.metrics or f"metrics/{stage}.json", summary)
    from gac.training.curves import write_curves

    write_curves(Path(section.out) / "logs" / "metrics.csv", args.plots or Path(section.out) / "plots")
    from gac.training.stages import TRAINED_STAGES

    print(
        f"{stage}: best {TRAINED_STAGES[stage].task.monitor} {result.best_score:.4f} (step {result.global_step}); "
        f"trainable {result.trainable['trainable']:,} of {result.trainable['total']:,} "
        f"({100 * result.trainable['share']:.2f} %); model {result.model_dir}"
    )


def _cross_fit(stage: str, section, catalog_root: str, source_root: str, cfg, train: bool):
    """Stage 2 with ``cross_fit_folds`` ≥ 2: ``(train ids, fold model folders)`` — trained now (``train``; every DDP
    rank takes part, non-zero ranks get ``None`` folders) or the saved ones; ``None`` without cross-fitting."""
    if stage != "stage2" or section.cross_fit_folds < 2:
        return None
    from gac import crossfit
    from gac.store import ShardStore
    from gac.training.data import rows_of

    if train:
        return crossfit.fit_folds(section, cfg.mlflow, catalog_root, source_root, cfg.data.exclude,
                                  {"gac.data": cfg.data.source})  # fmt: skip
    train_ids = rows_of(ShardStore(catalog_root), ShardStore(source_root), "train", None, cfg.data.exclude)
    return list(train_ids["patch_id"]), [str(crossfit.fold_dir(section.out, i) / "model")
                                         for i in range(section.cross_fit_folds)]  # fmt: skip


def _with_folds(model, folds, device) -> tuple:
    """``(model routed out of fold, provenance)`` for :func:`_cross_fit`'s result; ``(model, {})`` without."""
    if folds is None:
        return model, {}
    from gac.crossfit import OutOfFold
    from gac.training.export import load_model

    train_ids, dirs = folds
    fold_models = [load_model(d, device)[2] for d in dirs]
    return OutOfFold(model, fold_models, train_ids), {"cross_fit_folds": len(dirs), "fold_models": dirs}
