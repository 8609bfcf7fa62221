"""Fit a stage with Lightning, keep its best and last checkpoints, and log and register it in MLflow.

One call of :func:`fit` trains (or continues) one model: params (once, flat), per-step losses, validation metrics, the
σ head's calibration (:mod:`gac.training.calibration`, when the stage has one), the best checkpoint, the data it read
as MLflow dataset inputs, its curves and two validation tiles as PNGs (:mod:`gac.training.run_media`), and the
exported model (see :mod:`gac.mlops.registry_model`) registered as a new version of ``gac-stage2``/``gac-stage3``
with the alias ``challenger``.

**When a training continues and when it starts again** (the one place this rule lives). ``checkpoints/fit.json``
records the training's *identity*:

* the content digests of what it consumes — the catalog and the previous stage's cache
  (:meth:`gac.io.store.ShardStore.content_digest`; never their paths, so a new opt_v2 at the same path is new input);
* every param of the stage section that can change the model (architecture, weights, LoRA, loss weights, lr and
  schedule, batch size, precision, devices, validation cadence, early stopping, seed, ``max_tiles``).

If the identity matches, the fit **continues** from ``checkpoints/last.ckpt`` (Lightning restores the step, optimiser,
scheduler and data-loader epoch, so nothing is repeated). Params that cannot change what was trained so far —
:data:`CONTINUABLE`: ``out``, ``train.num_workers``, ``train.save_every_n_steps`` and a *larger* ``train.epochs`` or
``train.max_steps`` — and the ``cache`` section (how the next cache is written) continue too (more epochs extend a
finished training). A *smaller* budget than the checkpoint was trained for, or any other change, **starts a new
training**: the old checkpoints are removed and a new MLflow run begins.

**MLflow runs.** A continued training logs into the run that started it when it runs in the same DVC experiment (a
killed ``dvc repro`` resumed); in another experiment (``dvc exp run -S stage3.train.epochs=…``) it gets a run of its
own, tagged ``gac.resumed_from_run``. Every run is named and tagged with its stage, DVC experiment and git revision
(:func:`gac.io.tracking.run_name`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gac import config
from gac.config import MlflowParams, Stage2Params, Stage3Params
from gac.io import fingerprint, tracking
from gac.io.atomic import atomic_path, write_text
from gac.io.store import ShardStore
from gac.pipeline import StageName as S
from gac.training import run_media
from gac.training.calibration import calibrate
from gac.training.crossfit import fold_dir, fold_of
from gac.training.data import rows_of
from gac.training.datamodule import PairDataModule
from gac.training.export import has_sigma, save_model
from gac.training.stages import TRAINED_STAGES

CHECKPOINTS = "checkpoints"
#: ``(model_dir, section, metrics, trainable, register=, tags=) -> registered version or None``: how a fitted model
#: is logged in its run (:func:`gac.mlops.registry.log_and_register`).
LogModel = Callable[..., "str | None"]
#: Section fields (dotted) that cannot change what has been trained so far: changing them continues the training.
#: ``train.epochs``/``train.max_steps`` continue only when they grow (see :func:`_continues`).
CONTINUABLE = (
    "out", "train.num_workers", "train.save_every_n_steps", "train.epochs", "train.max_steps", "cross_fit_folds",
)  # fmt: skip


@dataclass
class FitResult:
    """What a fit left behind (on global rank 0; other ranks get ``None`` from :func:`fit`)."""

    stage: str
    best_checkpoint: str
    last_checkpoint: str
    best_score: float
    global_step: int
    #: ``val/*`` of the fit's last validation, or of the best weights scored again when nothing was left to train.
    metrics: dict[str, float]
    run_id: str | None
    model_dir: str
    trainable: dict
    #: The σ head's per-band temperature and calibrated validation report (:func:`gac.training.calibration.calibrate`);
    #: empty for a model without a σ head.
    calibration: dict[str, float] = field(default_factory=dict)


def _trainer(section: Stage2Params | Stage3Params, out: Path, task_cls, logger, extra_callbacks=(), steps_per_epoch=1):
    """The Lightning trainer of a stage; float cadences are fractions of an epoch of ``steps_per_epoch`` steps."""
    import math

    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    t = section.train
    save_every = t.save_every_n_steps
    if isinstance(save_every, float):
        save_every = max(1, math.ceil(save_every * steps_per_epoch))
    last = ModelCheckpoint(
        dirpath=out / CHECKPOINTS,
        filename="step{step}",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=save_every,
        auto_insert_metric_name=False,
        enable_version_counter=False,  # one last.ckpt, overwritten: a resumed fit must not leave last-v1.ckpt behind
    )
    best = ModelCheckpoint(
        dirpath=out / CHECKPOINTS,
        filename="best",
        monitor=task_cls.monitor,
        mode=task_cls.mode,
        save_top_k=1,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    callbacks = [last, best, *extra_callbacks]
    if t.early_stopping:
        # checked after each validation only: at an epoch's end (or a max_steps stop inside the first epoch) there
        # may have been no validation yet, and Lightning would then fail the run for want of the metric
        callbacks.append(EarlyStopping(monitor=task_cls.monitor, mode=task_cls.mode, patience=t.patience,
                                       check_on_train_epoch_end=False))  # fmt: skip
    trainer = L.Trainer(
        max_epochs=t.epochs,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.grad_accum_steps,
        precision=t.precision,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        val_check_interval=t.val_every_n_steps,  # int: batches; float: fraction of an epoch (Lightning's meaning)
        check_val_every_n_epoch=1 if isinstance(t.val_every_n_steps, float) else None,
        log_every_n_steps=1,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=out,
        enable_progress_bar=bool(os.environ.get("GAC_PROGRESS", "1") == "1"),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    return trainer, best, last


def fit(
    stage: str,
    section: Stage2Params | Stage3Params,
    mlflow_params: MlflowParams,
    catalog_root: str,
    source_root: str,
    tags: dict[str, str] | None = None,
    register: bool = True,
    extra_callbacks=(),
    run_id: str | None = None,
    exclude: Sequence[str] = (),
    holdout: Sequence[str] = (),
    log_model: LogModel | None = None,
) -> FitResult | None:
    """Train ``stage`` (``stage2``/``stage3``) on the catalog + previous cache; resume if ``last.ckpt`` exists.

    ``run_id`` logs into an existing MLflow run (a sweep trial's nested run) instead of a new one; ``exclude`` names
    the quality flags (``data.exclude``) whose tiles are left out and ``holdout`` train tiles not to train on (a
    cross-fitting fold, :mod:`gac.training.crossfit`); both are part of the training's identity. ``log_model``
    logs the exported model folder in the run (and registers it when ``register``): the caller passes
    :func:`gac.mlops.registry.log_and_register`, so training needs no registry of its own.
    """
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    spec = TRAINED_STAGES[stage]
    out = Path(section.out)
    L.seed_everything(section.train.seed, workers=True, verbose=False)
    tracking.setup(mlflow_params)
    last_ckpt = out / CHECKPOINTS / "last.ckpt"
    run_file = out / CHECKPOINTS / "mlflow_run.json"
    settings = out / CHECKPOINTS / "fit.json"
    wanted = identity(stage, section, catalog_root, source_root, exclude, holdout)
    resume = last_ckpt.is_file() and _continues(_read_json(settings), wanted)
    if not resume and (out / CHECKPOINTS).exists() and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        import shutil

        shutil.rmtree(out / CHECKPOINTS)  # another training: its checkpoints cannot be continued
    earlier_run = _read_json(run_file) if resume else {}
    experiment = tracking.dvc_experiment()
    if run_id is None and earlier_run.get("experiment") == experiment:  # the same experiment resumes its own run
        run_id = earlier_run.get("run_id")
    all_tags = tracking.run_tags(stage) | (tags or {})
    if resume and earlier_run.get("run_id") and earlier_run.get("run_id") != run_id:
        all_tags["gac.resumed_from_run"] = earlier_run["run_id"]
    mlf = MLFlowLogger(
        experiment_name=mlflow_params.experiment,
        tracking_uri=tracking.uri(mlflow_params),
        run_name=tracking.run_name(stage),
        tags=all_tags,
        run_id=run_id,
        log_model=False,
    )
    new_run = run_id is None
    csv_file = out / "logs" / "metrics.csv"
    # Lightning's CSVLogger deletes metrics.csv when it starts: a resumed fit puts back the rows of the earlier steps
    # (flushed every step, so a killed fit leaves all of its rows on disk).
    earlier = csv_file.read_text() if resume and csv_file.is_file() else None
    csv = CSVLogger(save_dir=out, name="logs", version="", flush_logs_every_n_steps=1)
    task = spec.task(section.model_dump())
    t = section.train
    data = PairDataModule(catalog_root, source_root, t.batch_size, t.num_workers, t.max_tiles, exclude, holdout)
    data.setup("fit")  # the epoch's length, for cadences given as fractions of it
    world = (t.devices if isinstance(t.devices, int) else 1) * t.num_nodes
    steps_per_epoch = math.ceil(len(data.train_ids) / (t.batch_size * world) / t.grad_accum_steps)
    trainer, best_cb, _ = _trainer(section, out, spec.task, [mlf, csv], extra_callbacks, steps_per_epoch)
    if trainer.is_global_zero:
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        write_text(settings, json.dumps(wanted, indent=2, sort_keys=True))
        write_text(run_file, json.dumps({"run_id": mlf.run_id, "experiment": experiment}))
        if new_run:  # MLflow params are immutable: a resumed run keeps the ones it started with
            mlf.log_hyperparams(_flat(section.model_dump()))
    trainer.fit(task, datamodule=data, ckpt_path=str(last_ckpt) if resume else None)
    best_path = best_cb.best_model_path or str(last_ckpt)
    state = torch.load(best_path, map_location="cpu", weights_only=True)
    # The best weights go into a freshly built model on the training device: bitsandbytes refuses int8 weights in
    # layers that have already run, and cannot move quantised ones (see gac.models.prithvi, "int8").
    task = spec.task(section.model_dump()).build(trainer.strategy.root_device)
    task.load_state_dict(state["state_dict"])
    calibration = {}
    if has_sigma(task.model):  # σ scaled on the validation split before the model is saved (gac.training.calibration)
        calibration = calibrate(stage, task.model, data.val_dataloader(), trainer.strategy.root_device)
    # A fit that found its training already complete (dvc repro after a change to the code, not to the settings)
    # validated nothing: score the best weights now, with today's metric code, instead of reporting stale scores.
    rescored = not any(k.startswith("val/") for k in trainer.callback_metrics)
    if rescored:
        trainer.validate(task, datamodule=data, verbose=False)
    if not trainer.is_global_zero:
        return None
    if earlier is not None:
        _restore_earlier_rows(csv_file, earlier)
    trainable = spec.report(task.model)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if rescored and spec.task.monitor in metrics:
        best_score = metrics[spec.task.monitor]
    elif best_cb.best_model_score is not None:
        best_score = float(best_cb.best_model_score)
    else:
        best_score = float("nan")
    model_dir = save_model(stage, section, task.model, out / "model")
    result = FitResult(
        stage=stage,
        best_checkpoint=best_path,
        last_checkpoint=str(last_ckpt),
        best_score=best_score,
        global_step=trainer.global_step,
        metrics=metrics,
        run_id=mlf.run_id,
        model_dir=str(model_dir),
        trainable={k: v for k, v in trainable.items() if k != "names"},
        calibration=calibration,
    )

    def media() -> None:
        """What the run shows besides numbers: the data it read, its curves and two validation tiles."""

        tracking.log_datasets({"catalog": catalog_root, Path(source_root).name: source_root}, "training")
        run_media.log_curves(csv_file, stage)
        run_media.log_validation_tiles(stage, task.model, catalog_root, source_root, exclude)

    _log_result(result, mlflow_params, section, register, tags or {}, media, log_model)
    return result


def identity(
    stage: str,
    section: Stage2Params | Stage3Params,
    catalog_root: str,
    source_root: str,
    exclude: Sequence[str] = (),
    holdout: Sequence[str] = (),
) -> dict:
    """What a training *is*: its inputs' content, the tiles left out and the params that change the model."""

    params = _flat(section.model_dump())
    return {
        "stage": stage,
        "inputs": {
            "catalog": ShardStore(catalog_root).content_digest(),
            "source": ShardStore(source_root).content_digest(),
            "exclude": sorted(exclude),
            "holdout": fingerprint.ids_digest(sorted(holdout)) if holdout else None,
        },
        "model": {k: v for k, v in params.items() if k not in CONTINUABLE and not k.startswith("cache.")},
        "budget": {"epochs": params["train.epochs"], "max_steps": params["train.max_steps"]},
    }


def _continues(earlier: dict, wanted: dict) -> bool:
    """Whether a training recorded as ``earlier`` can be continued as ``wanted`` (same identity, budget not cut)."""
    if not earlier or any(earlier.get(k) != wanted[k] for k in ("stage", "inputs", "model")):
        return False

    def steps(v: int) -> float:
        return float("inf") if v is None or v < 0 else v

    before, now = earlier.get("budget", {}), wanted["budget"]
    return now["epochs"] >= before.get("epochs", 0) and steps(now["max_steps"]) >= steps(before.get("max_steps"))


def _read_json(path: Path) -> dict:
    """A small JSON record, or ``{}`` when it is missing or unreadable (then nothing is resumed from it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _restore_earlier_rows(csv_file: Path, earlier: str) -> None:
    """Prepend the rows of ``earlier`` (a metrics.csv) whose steps come before the resumed fit's first logged step."""
    import io

    import pandas as pd

    before = pd.read_csv(io.StringIO(earlier))
    after = pd.read_csv(csv_file) if csv_file.is_file() else before.iloc[:0]
    first = after["step"].min() if len(after) else float("inf")
    with atomic_path(csv_file) as tmp:
        pd.concat([before[before["step"] < first], after], ignore_index=True).to_csv(tmp, index=False)


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested params → ``a.b`` keys for MLflow."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _log_result(
    result: FitResult,
    mlflow_params: MlflowParams,
    section,
    register: bool,
    tags: dict,
    media=lambda: None,
    log_model: LogModel | None = None,
) -> None:
    """Log the best checkpoint, ``media`` (called in the run) and, through ``log_model``, the model to the run."""
    import mlflow

    tracking.use(tracking.uri(mlflow_params))
    active = mlflow.active_run()
    same = active is not None and active.info.run_id == result.run_id  # a sweep trial's run is already open
    with contextlib.nullcontext() if same else mlflow.start_run(run_id=result.run_id):
        mlflow.log_metrics(
            {
                "best_score": result.best_score,
                "trainable_share": result.trainable["share"],
                "trainable_params": result.trainable["trainable"],
            }
            | result.calibration
        )
        mlflow.log_artifact(result.best_checkpoint, "checkpoints")
        mlflow.log_text(json.dumps(result.trainable, indent=2), "trainable.json")
        media()
        version = None
        if log_model is not None:
            version = log_model(
                result.model_dir, section, result.metrics, result.trainable, register=register, tags=tags
            )
    if version:  # metrics stay numbers (and strict JSON): no entry when nothing was registered
        result.metrics["registered_version"] = int(version)


def fit_folds(
    section, mlflow_params, catalog_root: str, source_root: str, exclude: Sequence[str], tags: dict, log_model=None
):
    """Train the ``section.cross_fit_folds`` fold models of Stage 2; returns ``(train ids, model folders)``.

    Every rank calls this under DDP (each fold is one more Lightning fit); only rank 0 gets the folders back.
    """

    k = section.cross_fit_folds
    train = list(rows_of(ShardStore(catalog_root), ShardStore(source_root), "train", None, exclude)["patch_id"])
    dirs = []
    for i in range(k):
        held = [pid for pid in train if fold_of(pid, k) == i]
        fold_section = config.override(section, out=str(fold_dir(section.out, i)), cross_fit_folds=0)
        result = fit(S.STAGE2, fold_section, mlflow_params, catalog_root, source_root, register=False,
                     tags=tags | {"gac.cross_fit_fold": f"{i}/{k}"}, exclude=exclude, holdout=held,
                     log_model=log_model)  # fmt: skip
        dirs.append(None if result is None else result.model_dir)
    return train, dirs
