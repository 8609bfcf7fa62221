"""Multi-objective Optuna sweep of a trained stage: LoRA rank/alpha, learning rate and loss weights.

Each trial trains through the very code of its stage (:func:`gac.training.fit.fit`) and is scored on the validation
split with :mod:`gac.evaluation.metrics`: maximise PSNR and SSIM, minimise SAM and SAR-edge agreement. Tracking:

* **Optuna storage** (``sweep.storage``): a SQLite file by default, any SQLAlchemy URL (PostgreSQL) for many workers.
  The budget ``sweep.n_trials`` counts *completed* trials (plus those running now, so parallel workers do not
  overshoot it). Re-running the command loads the same study and runs only what is still missing; a trial a killed
  worker left ``RUNNING`` is failed by Optuna's heartbeat once it is :data:`GRACE_S` seconds stale, with its reason,
  and its place is taken by a new trial — nothing is lost, nothing is counted twice.
* **MLflow**: one parent run per study (its id is a study attribute, so every worker nests under the same one),
  named ``sweep · study <name> (<stage>) · <experiment> @ <rev>``, and one nested run per trial, named like the stage's
  own runs plus the trial (``stage2 · trial 3 · exp <name> @ <rev>``, :func:`gac.io.tracking.run_name`) and tagged
  ``optuna.study``/``optuna.trial``/``optuna.state``; it holds the trial's params, its objective values and what any
  training run holds (curves, validation tiles, datasets). Each trial links back: user attributes
  :data:`RUN_ID` and :data:`RUN_URL` (the run's page in the MLflow UI at ``mlflow.ui_url``). The runs are made here
  rather than by optuna-integration's ``MLflowCallback``, which names every run by the bare trial number and renames
  it so again when it logs the values.
* **Optuna names the objectives** (``study.set_metric_names``): optuna-dashboard and ``trials_dataframe`` show
  ``psnr``/``ssim``/``sam_deg``/``sar_edge``, not "Objective 0…3".
* A trial that raises (OOM, NaN loss, bad setting) is recorded ``FAIL`` with its reason and the study goes on.

The Pareto front is written as ``pareto.csv`` and ``pareto.png`` and logged to the parent run. The *best* trial is the
Pareto trial closest to the promotion targets (:func:`target_distance`). It was *selected* on the validation split, so
before it is registered ``@challenger`` it is scored on the **test** split by the code ``gac evaluate`` scores a
champion with (:func:`gac.evaluation.metrics.per_tile` over the catalog's test tiles less ``data.exclude``, on the DN
the stage's
cache would hold), and those numbers are its ``eval.*`` tags (``eval.split=test``): ``gac promote`` then compares
challenger and champion on the same split by the same code.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from gac import config
from gac.config import Params, TargetParams
from gac.errors import GacError
from gac.evaluation import metrics
from gac.evaluation.direction import direction
from gac.io import tracking
from gac.io.provenance import lineage
from gac.io.store import ShardStore
from gac.mlops import registry
from gac.mlops.model_card import tag_evaluation
from gac.pipeline import StageName as S
from gac.pipeline import output
from gac.training.data import PairDataset, rows_of
from gac.training.export import apply, load_model
from gac.training.fit import fit

OBJECTIVES = ("psnr", "ssim", "sam_deg", "sar_edge")
DIRECTIONS = tuple(direction(m) for m in OBJECTIVES)
PARENT_RUN = "mlflow_parent_run_id"
#: Trial user attributes linking a trial to its MLflow run: the run id and the run's page in the MLflow UI.
RUN_ID = "mlflow_run_id"
RUN_URL = "mlflow_run_url"
#: Trial user attribute: the MLflow URI of the model the trial logged (``models:/m-…``), loadable on every host.
MODEL_URI = "mlflow_model_uri"
COUNTED = ("COMPLETE", "RUNNING")
#: Heartbeat of running trials and how stale one may get before it is declared failed (its worker died).
HEARTBEAT_S = 3
GRACE_S = 10


def target_distance(values: dict[str, float], targets: TargetParams) -> float:
    """Sum of relative shortfalls from the targets (0 when all are met): the rule that picks the best trial."""
    short = {
        "psnr": max(0.0, targets.psnr - values["psnr"]) / targets.psnr,
        "ssim": max(0.0, targets.ssim - values["ssim"]) / targets.ssim,
        "sam_deg": max(0.0, values["sam_deg"] - targets.sam_deg) / targets.sam_deg,
        "sar_edge": max(0.0, values["sar_edge"] - targets.sar_edge) / targets.sar_edge,
    }
    return sum(short.values())


def suggest(trial, cfg: Params):
    """The trial's stage section: the search space of ``sweep.space`` applied to the stage's params."""

    space, stage = cfg.sweep.space, cfg.sweep.stage
    section = getattr(cfg, stage)
    rank = trial.suggest_categorical("lora_rank", list(space.lora_rank))
    lr = trial.suggest_float("lr", *space.lr, log=True)
    if stage == S.STAGE2:
        weights = {"l1_weight": trial.suggest_float("l1_weight", *space.l1_weight),
                   "ms_ssim_weight": trial.suggest_float("ms_ssim_weight", *space.ms_ssim_weight)}  # fmt: skip
    else:
        weights = {"sar_edge_weight": trial.suggest_float("sar_edge_weight", *space.sar_edge_weight),
                   "cycle_weight": trial.suggest_float("cycle_weight", *space.cycle_weight)}  # fmt: skip
    lora = config.override(section.lora, rank=rank, alpha=2.0 * rank)
    train = config.override(section.train, lr=lr, seed=cfg.sweep.seed + trial.number)
    out = str(Path(cfg.sweep.out) / f"trial-{trial.number:04d}")
    return config.override(section, lora=lora.model_dump(), train=train.model_dump(), out=out, **weights)


def score(
    stage: str, model, catalog_root: str, source_root: str, split: str = "validation", exclude: tuple[str, ...] = ()
) -> dict[str, float]:
    """Mean per-tile metrics of ``model`` on ``split`` and the number of ``tiles`` (the study optimises the means).

    The prediction is rounded to the uint16 DN a stage's cache stores (:func:`gac.inference.engine.to_dn`) before
    scoring, so
    these are the numbers ``gac evaluate`` gets from a cache this model wrote: the same tiles, values and metric code.
    """
    import torch

    ids = list(rows_of(ShardStore(catalog_root), ShardStore(source_root), split, exclude=exclude)["patch_id"])
    if not ids:
        raise GacError(f"{catalog_root}: no '{split}' tiles in both the catalog and {source_root} to score on")
    loader = torch.utils.data.DataLoader(PairDataset(catalog_root, source_root, ids), batch_size=8)
    sums: dict[str, float] = {}
    with torch.inference_mode():
        for batch in loader:
            pred = apply(stage, model.eval(), batch["s1"], batch["source"]).float()
            dn = metrics.DN_SCALE
            pred_dn = (pred * dn).round().clamp(0, 65535)  # what the cache stores (np.rint rounds half to even too)
            for name, values in metrics.per_tile(pred_dn, batch["target"] * dn, batch["s1"]).items():
                sums[name] = sums.get(name, 0.0) + float(values.sum())
    return {k: v / len(ids) for k, v in sums.items()} | {"tiles": len(ids)}


def source_of(cfg: Params) -> str:
    """The cache a swept stage trains on."""
    return cfg.stage1.out if cfg.sweep.stage == S.STAGE2 else f"{cfg.stage2.out}/{output(S.STAGE2)}"


def counted(study) -> int:
    """Trials that use up the budget: completed, or running with a live heartbeat (stale ones are failed first)."""
    import optuna

    optuna.storages.fail_stale_trials(study)
    states = tuple(getattr(optuna.trial.TrialState, s) for s in COUNTED)
    return len(study.get_trials(deepcopy=False, states=states))


def failed(study) -> int:
    """Failed trials (exceptions, NaN objectives, killed workers)."""
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))


def open_study(cfg: Params):
    """Create or load the study on ``sweep.storage`` (heartbeats fail trials of killed workers).

    Workers that start together (on one host or several) race to create Optuna's tables and the study; the loser of
    that race sees an integrity error, or on PostgreSQL a "relation already exists" (a ``ProgrammingError``), and
    simply loads what the winner made.
    """
    import optuna
    import sqlalchemy.exc

    sampler = optuna.samplers.NSGAIISampler(seed=cfg.sweep.seed, population_size=max(2, min(8, cfg.sweep.n_trials)))
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(
                cfg.sweep.storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
            study = optuna.create_study(study_name=cfg.sweep.study, storage=storage, directions=list(DIRECTIONS),
                                        sampler=sampler, load_if_exists=True)  # fmt: skip
            if study.metric_names != list(OBJECTIVES):  # the dashboard's axis and column names
                study.set_metric_names(list(OBJECTIVES))
            return study
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, optuna.exceptions.DuplicatedStudyError):
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def run(cfg: Params, n_trials: int | None = None, register: bool = True) -> dict[str, Any]:
    """Run this worker's share of the study until the budget is used; on completion write the Pareto front."""
    import mlflow

    budget = n_trials or cfg.sweep.n_trials
    worker = os.environ.get("GAC_WORKER") or f"{socket.gethostname()}:{os.getpid()}"
    stage, catalog_root, source_root = cfg.sweep.stage, cfg.catalog.out, source_of(cfg)
    study = open_study(cfg)
    tracking.setup(cfg.mlflow)
    storage = cfg.sweep.storage.split("@")[-1]  # no credentials in params or tags
    study_tags = {"optuna.study": cfg.sweep.study, "optuna.storage": storage, "gac.data": cfg.data.source}
    # Workers that start together (on any host) would each make a parent run: the first to hold the lock makes it
    parent_id = study.user_attrs.get(PARENT_RUN)
    if parent_id is None:
        with registry.registry_lock([f"sweep-{cfg.sweep.study}"], "creating the sweep's parent run"):
            parent_id = study.user_attrs.get(PARENT_RUN)
            if parent_id is None:
                detail = f"study {cfg.sweep.study} ({stage})"
                with tracking.start_run(cfg.mlflow, "sweep", tags=study_tags, detail=detail) as p:
                    mlflow.log_params({"study": cfg.sweep.study, "stage": stage, "budget": budget, "storage": storage})
                url = tracking.run_url(cfg.mlflow, p.info.experiment_id, p.info.run_id)
                study.set_user_attr("mlflow_parent_run_url", url)
                study.set_user_attr(PARENT_RUN, p.info.run_id)
                parent_id = p.info.run_id
    _check_parent(cfg, parent_id)

    def objective(trial):
        section = suggest(trial, cfg)
        trial.set_user_attr("out", section.out)
        trial.set_user_attr("worker", worker)
        tags = tracking.run_tags(stage) | study_tags | {"optuna.trial": str(trial.number)}
        name = tracking.run_name(stage, f"trial {trial.number}")
        with mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
            trial.set_user_attr(RUN_ID, run.info.run_id)
            trial.set_user_attr(RUN_URL, tracking.run_url(cfg.mlflow, run.info.experiment_id, run.info.run_id))
            mlflow.log_params(trial.params)
            result = fit(stage, section, cfg.mlflow, catalog_root, source_root, register=False, tags=tags,
                         log_model=registry.log_and_register,
                         run_id=run.info.run_id, exclude=cfg.data.exclude)  # fmt: skip
            _, _, model = load_model(result.model_dir)
            values = score(stage, model, catalog_root, source_root, exclude=tuple(cfg.data.exclude))
            trial.set_user_attr("model_dir", result.model_dir)
            trial.set_user_attr(MODEL_URI, _logged_model_uri(run.info.run_id))
            out = {k: values[k] for k in OBJECTIVES}
            mlflow.log_metrics(out)
            if not all(math.isfinite(v) for v in out.values()):
                raise FloatingPointError(f"non-finite objective values {out}")
            return list(out.values())

    def record_state(study, trial) -> None:
        """The trial's final state (and why it failed) on its MLflow run, which exists once the objective began."""
        if trial.user_attrs.get(RUN_ID):
            client, run_id = mlflow.MlflowClient(), trial.user_attrs[RUN_ID]
            client.set_tag(run_id, "optuna.state", trial.state.name)
            if trial.system_attrs.get("fail_reason"):
                client.set_tag(run_id, "optuna.fail_reason", str(trial.system_attrs["fail_reason"])[:5000])

    with mlflow.start_run(run_id=parent_id):
        while counted(study) < budget:
            if failed(study) >= max(budget, 3):  # every trial fails: a bug or a bad space, not bad luck
                raise GacError(f"sweep {cfg.sweep.study}: {failed(study)} failed trials (see trials.csv / MLflow)")
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[record_state])
    wait_for_others(study)
    return summarise(cfg, study, register=register)


def _check_parent(cfg: Params, parent_id: str) -> None:
    """The study's parent run must be in this worker's tracking store: one line saying how to get there if not."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(parent_id)
    except MlflowException:
        raise GacError(
            f"sweep.storage {cfg.sweep.storage.split('@')[-1]}: study {cfg.sweep.study}'s MLflow parent run "
            f"{parent_id} is not in {tracking.safe_uri(tracking.uri(cfg.mlflow))}: every worker of a shared study "
            f"logs to the same MLflow server (export MLFLOW_TRACKING_URI=http://<server>:5000 on each host)"
        ) from None


#: Seconds between looks at the trials other workers are still running (:func:`wait_for_others`).
WAIT_POLL_S = 2.0


def wait_for_others(study) -> None:
    """Return once no trial is running: the budget is used up, but other workers (other hosts) may still be finishing
    trials that count toward it, and the Pareto front and the winner must include them. A worker that died is failed
    by the heartbeat (:func:`counted` calls ``fail_stale_trials``), so this never waits for good."""
    import optuna

    announced = False
    while True:
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:
            return
        if not announced:
            print(f"sweep {study.study_name}: waiting for {len(running)} trial(s) other workers are running "
                  f"({', '.join(str(t.number) for t in running)}) before summarising", flush=True)  # fmt: skip
            announced = True
        time.sleep(WAIT_POLL_S)


def summarise(cfg: Params, study, register: bool = True) -> dict[str, Any]:
    """Write the trials and the Pareto front, pick the best trial by target distance; with ``register``, score it on
    the test split and register it ``@challenger`` with those scores (:func:`_register`)."""
    import mlflow
    import optuna
    import pandas as pd

    out = Path(cfg.sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    rows = []
    pareto_numbers = {t.number for t in study.best_trials}
    for t in trials:
        row = {"number": t.number, "state": t.state.name, **t.params, "pareto": t.number in pareto_numbers,
               RUN_URL: t.user_attrs.get(RUN_URL, "")}  # fmt: skip
        if t.values:
            row |= dict(zip(OBJECTIVES, t.values, strict=True))
        if t.state == optuna.trial.TrialState.FAIL:
            row["fail_reason"] = t.system_attrs.get("fail_reason", "")
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "trials.csv", index=False)
    pareto = table[table["pareto"]] if len(table) else table
    pareto.to_csv(out / "pareto.csv", index=False)
    summary: dict[str, Any] = {"trials": len(trials), "complete": int((table["state"] == "COMPLETE").sum()),
                               "failed": int((table["state"] == "FAIL").sum()), "pareto": len(pareto)}  # fmt: skip
    if len(pareto):
        _plot(pareto, out / "pareto.png")
        best = min(study.best_trials,
                   key=lambda t: (target_distance(dict(zip(OBJECTIVES, t.values, strict=True)), cfg.promote.targets),
                                  -t.values[0]))  # fmt: skip
        summary["best_trial"] = best.number
        summary["best"] = dict(zip(OBJECTIVES, best.values, strict=True))
        summary["best_params"] = best.params
        tracking.use(tracking.uri(cfg.mlflow))
        with mlflow.start_run(run_id=study.user_attrs[PARENT_RUN]):
            mlflow.log_artifact(str(out / "pareto.csv"))
            mlflow.log_artifact(str(out / "trials.csv"))
            mlflow.log_artifact(str(out / "pareto.png"))
            mlflow.log_metrics({f"best.{k}": v for k, v in summary["best"].items()})
            mlflow.set_tag("best_trial", best.number)
        if register:
            summary["registered_version"], test = _register(cfg, best)
            summary["best_test"] = {k: test[k] for k in OBJECTIVES} | {"tiles": test["tiles"]}
    return summary


def _plot(pareto, path: Path) -> None:
    """PSNR against SAR-edge agreement of the Pareto trials (the two objectives that pull against each other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(pareto["sar_edge"], pareto["psnr"])
    for _, r in pareto.iterrows():
        ax.annotate(str(int(r["number"])), (r["sar_edge"], r["psnr"]))
    ax.set_xlabel("SAR-edge agreement (lower is better)")
    ax.set_ylabel("PSNR [dB]")
    ax.set_title("Pareto front")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _register(cfg: Params, best) -> tuple[str, dict[str, float]]:
    """Score the best trial's model on the test split, register it in its own MLflow run as ``@challenger`` and tag
    it with those test scores; return the version and the scores.

    The trial was chosen on the validation split; a champion's ``eval.*`` tags come from ``gac evaluate`` on the test
    split. Tagging the winner with its validation scores would let ``gac promote`` compare numbers measured on
    different tiles, so it is scored here as ``gac evaluate`` scores (see :func:`score`), before it is registered.

    **Exactly once, whatever the number of workers and hosts.** Every worker summarises the finished study, so each
    reaches this point; under the registry's lock (:func:`gac.mlops.registry.registry_lock`, a lock on the registry
    itself when it is a shared server) the first registers, and the others find its finished version by the tags
    ``optuna.study``/``optuna.trial`` and return it. The model comes from the trial's MLflow run when the host that
    trained it is another one.
    """

    tracking.use(tracking.uri(cfg.mlflow))
    name = registry.MODEL_NAMES[cfg.sweep.stage]
    with registry.registry_lock([name], f"registering sweep {cfg.sweep.study}'s winner"):
        done = _registered(cfg, name, best)
        if done is not None:
            return done
        with tempfile.TemporaryDirectory() as tmp:
            return _register_locked(cfg, best, _model_dir(best, Path(tmp)))


def _registered(cfg: Params, name: str, best) -> tuple[str, dict[str, float]] | None:
    """The version and test scores of this study's winner if a worker (of any host) registered it already."""
    import mlflow

    found = mlflow.MlflowClient().search_model_versions(
        f"name = '{name}' and tags.`optuna.study` = '{cfg.sweep.study}' and tags.`optuna.trial` = '{best.number}'"
    )
    done = [v for v in found if registry.DONE_TAG in v.tags]
    if not done:
        return None
    version = max(done, key=lambda v: int(v.version))
    test = {m: float(version.tags[f"eval.{m}"]) for m in OBJECTIVES if f"eval.{m}" in version.tags}
    test["tiles"] = int(float(version.tags.get("eval.tiles", 0)))
    print(f"sweep {cfg.sweep.study}: trial {best.number} is {name} version {version.version} already "
          f"(registered by another worker)")  # fmt: skip
    return str(version.version), test


def _model_dir(best, tmp: Path) -> str:
    """The winner's model folder: where it was trained if that is on this host, else downloaded from its MLflow run
    (a worker on another host trained it)."""
    import mlflow

    model_dir = best.user_attrs["model_dir"]
    if Path(model_dir).is_dir() or MODEL_URI not in best.user_attrs:
        return model_dir
    folder = Path(mlflow.artifacts.download_artifacts(best.user_attrs[MODEL_URI], dst_path=str(tmp)))
    return str(folder / "artifacts" / "model")


def _logged_model_uri(run_id: str) -> str:
    """``models:/<id>`` of the model a trial's run logged (:func:`gac.mlops.registry.log_and_register`)."""
    import mlflow

    found = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")
    return f"models:/{found[0].model_id}" if found else ""


def _register_locked(cfg: Params, best, model_dir: str) -> tuple[str, dict[str, float]]:
    import mlflow

    stage, section, model = load_model(model_dir)
    test = score(stage, model, cfg.catalog.out, source_of(cfg), split="test", exclude=tuple(cfg.data.exclude))
    values = dict(zip(OBJECTIVES, best.values, strict=True))
    run_id = best.user_attrs.get(RUN_ID) or best.user_attrs["run_id"]  # "run_id": studies of earlier versions
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test/{k}": v for k, v in test.items() if k != "tiles" and math.isfinite(v)})
        version = registry.log_and_register(
            model_dir, section, values,
            tags={"gac.data": cfg.data.source, "optuna.study": cfg.sweep.study, "optuna.trial": str(best.number),
                  **lineage(cfg.sweep.stage, cfg.catalog.out, source_of(cfg))},
        )  # fmt: skip
    context = {"split": "test", "data_source": cfg.data.source, "source": f"optuna trial {best.number}",
               "run_id": run_id}  # fmt: skip
    tag_evaluation(mlflow.MlflowClient(), registry.MODEL_NAMES[cfg.sweep.stage], version, test, context)
    return version, test
