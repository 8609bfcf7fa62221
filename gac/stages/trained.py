"""What Stage 2 and Stage 3 share: train (resumably), log and register the model, write the next cache, the DVC
metrics and the training curves. :mod:`gac.stages.stage2` and :mod:`gac.stages.stage3` only say what goes in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gac.config import Params
from gac.inference import engine
from gac.inference.refine import write_cache
from gac.io import tracking
from gac.io.atomic import write_json
from gac.io.lock import exclusive_first_rank
from gac.io.provenance import lineage
from gac.io.store import ShardStore
from gac.mlops import registry
from gac.pipeline import StageName, metrics_beside, trained_model
from gac.training import crossfit
from gac.training.crossfit import OutOfFold
from gac.training.curves import write_curves
from gac.training.data import rows_of
from gac.training.export import load_model
from gac.training.fit import fit, fit_folds
from gac.training.stages import TRAINED_STAGES

#: The last validation's figures that ``metrics/<stage>.json`` holds besides the step, scores and sizes: ``dvc metrics
#: show`` prints one column per key of every metrics file, so the loss terms stay in the curves' log
#: (``<out>/logs/metrics.csv``) and the MLflow run.
SUMMARY_METRICS = ("val/loss", "val/psnr", "val/ssim", "val/sam_deg", "val/sar_edge", "val/selection")


@dataclass(frozen=True)
class TrainOptions:
    """What a run of a trained stage does besides training (the ``gac stage2/3`` switches that are not params)."""

    #: The tile catalog (default: ``catalog.out``).
    catalog_root: str | None = None
    #: Register the model ``@challenger`` in MLflow.
    register: bool = True
    #: Write the next stage's cache.
    write_cache: bool = True
    #: No training: write the next cache with ``<out>/model``.
    cache_only: bool = False
    #: The metrics file (default: ``<out>.metrics.json`` beside the stage's folder; the DVC stage passes
    #: ``metrics/<stage>.json``).
    metrics: str | None = None
    #: Folder of the training curves for ``dvc plots`` (default: ``<out>/plots``).
    plots: str | None = None


def run(stage: StageName, cfg: Params, section, source_root: str, next_cache: str, options: TrainOptions) -> dict:
    """Train, register, write the next cache and the DVC metrics of one stage (holding ``<out>``'s lock).

    Returns the summary written to the metrics file (``{}`` on non-zero DDP ranks and with ``cache_only``).
    """
    with exclusive_first_rank(section.out):
        return _run(stage, cfg, section, source_root, next_cache, options)


def _run(stage: StageName, cfg: Params, section, source_root: str, next_cache: str, options: TrainOptions) -> dict:
    catalog_root = options.catalog_root or cfg.catalog.out
    device = engine.resolve_device(section.cache.device)
    if options.cache_only:
        model_dir = Path(section.out) / "model"
        _, saved, model = load_model(model_dir, device)
        folds = _cross_fit(stage, section, catalog_root, source_root, cfg, False)
        model, crossfit = _with_folds(model, folds, device, getattr(section, "cross_fit_spread", False))
        origin = tracking.weights_origin(saved.pretrained, saved.ckpt_path)  # the folder's base, as training records it
        info = write_cache(stage, model, catalog_root, source_root, next_cache, section.cache,
                           provenance={"model_dir": str(model_dir), "data_source": cfg.data.source,
                                       "weights_origin": origin, **crossfit})  # fmt: skip
        if engine.dist()[0] == 0:
            print(f"{stage}: wrote {next_cache} ({info['tiles']} tiles, {info['errors']} errors) with {model_dir}")
        return {}
    upstream = lineage(stage, catalog_root, source_root)
    result = fit(
        stage,
        section,
        cfg.mlflow,
        catalog_root,
        source_root,
        tags={"gac.data": cfg.data.source, **upstream},
        register=options.register,
        log_model=registry.log_and_register,
        exclude=cfg.data.exclude,
    )
    # every rank takes part in the fold trainings (DDP); rank 0 gets the models
    folds = None if not options.write_cache else _cross_fit(stage, section, catalog_root, source_root, cfg, train=True)
    if result is None:  # a non-zero DDP rank: rank 0 does the rest
        return {}
    summary = {
        "best_score": result.best_score,
        "global_step": result.global_step,
        **{k: v for k, v in result.metrics.items() if k in SUMMARY_METRICS or k == "registered_version"},
        "trainable_params": result.trainable["trainable"],
        "trainable_share": result.trainable["share"],
    }
    if options.write_cache:
        _, _, model = load_model(result.model_dir, device)
        model, crossfit = _with_folds(model, folds, device, getattr(section, "cross_fit_spread", False))
        version = result.metrics.get("registered_version")
        info = write_cache(
            stage,
            model,
            catalog_root,
            source_root,
            next_cache,
            section.cache,
            provenance={
                "weights_origin": tracking.weights_origin(section.pretrained, section.ckpt_path),
                "registered_model": trained_model(stage).registry_name if options.register else None,
                "version": str(version) if version else None,
                "model_dir": result.model_dir,
                "data_source": cfg.data.source,
                "lineage": upstream,
                **crossfit,
            },
            distributed=False,  # the other DDP ranks have ended: rank 0 writes every shard
        )
        summary["seconds_per_tile"] = info["seconds_per_tile"]
    write_json(options.metrics or metrics_beside(section.out), summary)

    write_curves(Path(section.out) / "logs" / "metrics.csv", options.plots or Path(section.out) / "plots")

    print(
        f"{stage}: best {TRAINED_STAGES[stage].task.monitor} {result.best_score:.4f} (step {result.global_step}); "
        f"trainable {result.trainable['trainable']:,} of {result.trainable['total']:,} "
        f"({100 * result.trainable['share']:.2f} %); model {result.model_dir}"
    )
    return summary


def _cross_fit(stage: str, section, catalog_root: str, source_root: str, cfg, train: bool):
    """Stage 2 with ``cross_fit_folds`` ≥ 2: ``(train ids, fold model folders)`` — trained now (``train``; every DDP
    rank takes part, non-zero ranks get ``None`` folders) or the saved ones; ``None`` without cross-fitting."""
    if stage != StageName.STAGE2 or section.cross_fit_folds < 2:
        return None
    if train:
        return fit_folds(section, cfg.mlflow, catalog_root, source_root, cfg.data.exclude,
                                  {"gac.data": cfg.data.source}, registry.log_and_register)  # fmt: skip
    train_ids = rows_of(ShardStore(catalog_root), ShardStore(source_root), "train", None, cfg.data.exclude)
    return list(train_ids["patch_id"]), [str(crossfit.fold_dir(section.out, i) / "model")
                                         for i in range(section.cross_fit_folds)]  # fmt: skip


def _with_folds(model, folds, device, spread: bool = False) -> tuple:
    """``(model routed out of fold, provenance)`` for :func:`_cross_fit`'s result; ``(model, {})`` without."""
    if folds is None:
        return model, {}
    train_ids, dirs = folds
    fold_models = [load_model(d, device)[2] for d in dirs]
    return OutOfFold(model, fold_models, train_ids, spread), {"cross_fit_folds": len(dirs), "fold_models": dirs,
                                                              "cross_fit_spread": spread}  # fmt: skip
