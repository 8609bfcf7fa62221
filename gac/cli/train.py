"""What ``gac stage2`` and ``gac stage3`` share: the seed's training flags and the run that trains, registers and
writes the next cache."""

from __future__ import annotations

import argparse


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


def options(args: argparse.Namespace):
    """The run switches of ``gac stage2/3`` as :class:`gac.stages.trained.TrainOptions`."""
    from gac.stages.trained import TrainOptions

    return TrainOptions(catalog_root=args.data_dir, register=not args.no_register, write_cache=not args.no_cache,
                        cache_only=args.cache_only, metrics=args.metrics, plots=args.plots)  # fmt: skip
