"""Fit a stage with Lightning, keep its best and last checkpoints, and log and register it in MLflow.

One call of :func:`fit` is one MLflow run: params, per-step losses, validation metrics, the best checkpoint and the
exported model (see :mod:`gac.registry_model`) registered as a new version of ``gac-stage2``/``gac-stage3`` with the
alias ``challenger``. A rerun with the same folder resumes from ``checkpoints/last.ckpt``: Lightning restores the
step counter, optimiser, scheduler and the data loader's epoch, so nothing is repeated.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gac.atomic import atomic_path
from gac.config import MlflowParams, Stage2Params, Stage3Params
from gac.training.export import STAGES, save_model

CHECKPOINTS = "checkpoints"


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


def _trainer(section: Stage2Params | Stage3Params, out: Path, task_cls, logger, extra_callbacks=()):
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    t = section.train
    last = ModelCheckpoint(
        dirpath=out / CHECKPOINTS,
        filename="step{step}",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=t.save_every_n_steps,
        auto_insert_metric_name=False,
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
        callbacks.append(EarlyStopping(monitor=task_cls.monitor, mode=task_cls.mode, patience=t.patience))
    trainer = L.Trainer(
        max_epochs=t.epochs,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.grad_accum_steps,
        precision=t.precision,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
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
) -> FitResult | None:
    """Train ``stage`` (``stage2``/``stage3``) on the catalog + previous cache; resume if ``last.ckpt`` exists.

    ``run_id`` logs into an existing MLflow run (a sweep trial's nested run) instead of a new one.
    """
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    from gac import tracking
    from gac.training.data import PairDataModule

    spec = STAGES[stage]
    out = Path(section.out)
    L.seed_everything(section.train.seed, workers=True, verbose=False)
    tracking.setup(mlflow_params)
    last_ckpt = out / CHECKPOINTS / "last.ckpt"
    run_file = out / "mlflow_run_id"
    settings = out / CHECKPOINTS / "fit.json"
    wanted = json.dumps({"stage": stage, "section": section.model_dump(), "source": source_root}, sort_keys=True)
    resume = last_ckpt.is_file() and settings.is_file() and settings.read_text() == wanted
    if not resume and (out / CHECKPOINTS).exists() and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        import shutil

        shutil.rmtree(out / CHECKPOINTS)  # checkpoints of other settings cannot be resumed
    if run_id is None:  # resume logs into the run that started the training
        run_id = run_file.read_text().strip() if resume and run_file.is_file() else None
    all_tags = {"gac.stage": stage, "gac.git_commit": tracking.git_commit(), **(tags or {})}
    mlf = MLFlowLogger(
        experiment_name=mlflow_params.experiment,
        tracking_uri=mlflow_params.tracking_uri,
        run_name=stage,
        tags=all_tags,
        run_id=run_id,
        log_model=False,
    )
    csv_file = out / "logs" / "metrics.csv"
    # Lightning's CSVLogger deletes metrics.csv when it starts: a resumed fit puts back the rows of the earlier steps
    # (flushed every step, so a killed fit leaves all of its rows on disk).
    earlier = csv_file.read_text() if resume and csv_file.is_file() else None
    csv = CSVLogger(save_dir=out, name="logs", version="", flush_logs_every_n_steps=1)
    task = spec.task(section.model_dump())
    data = PairDataModule(
        catalog_root, source_root, section.train.batch_size, section.train.num_workers, section.train.max_tiles
    )
    trainer, best_cb, _ = _trainer(section, out, spec.task, [mlf, csv], extra_callbacks)
    if trainer.is_global_zero:
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        settings.write_text(wanted)
        run_file.write_text(mlf.run_id)
        if not resume:  # MLflow params are immutable: a resumed run keeps the ones it started with
            mlf.log_hyperparams(_flat(section.model_dump()))
    trainer.fit(task, datamodule=data, ckpt_path=str(last_ckpt) if resume else None)
    best_path = best_cb.best_model_path or str(last_ckpt)
    state = torch.load(best_path, map_location="cpu", weights_only=True)
    task.load_state_dict(state["state_dict"])
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
    )
    _log_result(result, mlflow_params, section, register, tags or {})
    return result


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


def _log_result(result: FitResult, mlflow_params: MlflowParams, section, register: bool, tags: dict) -> None:
    """Log the best checkpoint and the model to the run and register it as ``challenger``."""
    import mlflow

    from gac import registry

    mlflow.set_tracking_uri(mlflow_params.tracking_uri)
    active = mlflow.active_run()
    same = active is not None and active.info.run_id == result.run_id  # a sweep trial's run is already open
    with contextlib.nullcontext() if same else mlflow.start_run(run_id=result.run_id):
        mlflow.log_metrics(
            {
                "best_score": result.best_score,
                "trainable_share": result.trainable["share"],
                "trainable_params": result.trainable["trainable"],
            }
        )
        mlflow.log_artifact(result.best_checkpoint, "checkpoints")
        mlflow.log_text(json.dumps(result.trainable, indent=2), "trainable.json")
        version = registry.log_and_register(
            result.model_dir, section, result.metrics, result.trainable, register=register, tags=tags
        )
    if version:  # metrics stay numbers (and strict JSON): no entry when nothing was registered
        result.metrics["registered_version"] = int(version)
