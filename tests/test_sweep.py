"""The Optuna sweep: real studies on SQLite, real training per trial (PostgreSQL and several hosts: test_team.py).

Trials are made cheap (1–2 optimizer steps on 2 tiles), not fake: each one trains through the stage's own code.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import killpoint
import numpy as np
import pytest
import sweeping
from sweeping import ENV, sweep_cmd, sweep_params, trials_of

from gac.config import Params, TargetParams
from gac.evaluation.direction import higher_is_better
from gac.io.store import ShardStore
from gac.mlops.sweep import GRACE_S, HEARTBEAT_S, OBJECTIVES

pytestmark = pytest.mark.slow
stores = sweeping.stores  # the module-scoped fixture


def _dominates(a: dict[str, float], b: dict[str, float]) -> bool:
    """``a`` Pareto-dominates ``b`` under the direction table: no worse in any objective and better in one."""
    better = [a[m] > b[m] if higher_is_better(m) else a[m] < b[m] for m in OBJECTIVES]
    worse = [a[m] < b[m] if higher_is_better(m) else a[m] > b[m] for m in OBJECTIVES]
    return any(better) and not any(worse)


def _front(values: dict[int, dict[str, float]]) -> set[int]:
    """The trials no other completed trial dominates."""
    return {n for n, v in values.items() if not any(_dominates(w, v) for w in values.values())}


def _shortfall(values: dict[str, float], targets: TargetParams) -> float:
    """The documented winner rule, written out here from the direction table: the sum of each objective's shortfall
    from its promotion target, relative to the target (0 when every target is met)."""
    total = 0.0
    for m in OBJECTIVES:
        target = getattr(targets, m)
        gap = target - values[m] if higher_is_better(m) else values[m] - target
        total += max(0.0, gap) / target
    return total


def _winner(values: dict[int, dict[str, float]], targets: TargetParams) -> int:
    """The Pareto trial closest to the targets; among equally close ones the higher PSNR, then the lower number."""
    return min(sorted(_front(values)), key=lambda n: (_shortfall(values[n], targets), -values[n]["psnr"]))


def _assert_tables(out: Path, values: dict[int, dict[str, float]], states: dict[int, str]) -> None:
    """``trials.csv`` has every trial with its state; ``pareto.csv`` holds exactly the non-dominated completed trials,
    with their values as the study holds them (CSV floats read back to the same double)."""
    import pandas as pd

    trials = pd.read_csv(out / "trials.csv", float_precision="round_trip").set_index("number")
    assert trials["state"].to_dict() == states
    front = _front(values)
    assert set(trials.index[trials["pareto"]]) == front
    pareto = pd.read_csv(out / "pareto.csv", float_precision="round_trip").set_index("number")
    assert set(pareto.index) == front and (pareto["state"] == "COMPLETE").all()
    for n, row in pareto.iterrows():
        assert {m: row[m] for m in OBJECTIVES} == values[n], n


def test_summary_picks_the_pareto_trial_closest_to_the_targets(tmp_path, empty_mlflow_db):
    """Hand-made trials in a real study and MLflow store, chosen so that every wrong rule picks another winner: the
    highest PSNR misses a target, two trials meet every target (the higher PSNR wins), one trial is dominated, one
    failed; ``pareto.csv`` holds exactly the non-dominated trials."""
    import mlflow
    import optuna

    from gac.config import MlflowParams, SweepParams
    from gac.io import tracking
    from gac.mlops.sweep import DIRECTIONS, PARENT_RUN, summarise

    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    cfg = Params(mlflow=MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                     artifact_location=str(tmp_path / "art"), experiment="gac"),
                 sweep=SweepParams(out=str(tmp_path / "sweep")))  # fmt: skip
    t = cfg.promote.targets
    values = {  # 0, 1 meet every target (1 has the higher PSNR); 2 has the best PSNR but misses SSIM; 0 dominates 3
        0: {"psnr": t.psnr + 1, "ssim": t.ssim + 0.05, "sam_deg": t.sam_deg - 1, "sar_edge": t.sar_edge - 0.05},
        1: {"psnr": t.psnr + 2, "ssim": t.ssim + 0.05, "sam_deg": t.sam_deg - 1, "sar_edge": t.sar_edge - 0.03},
        2: {"psnr": t.psnr + 10, "ssim": t.ssim - 0.05, "sam_deg": t.sam_deg - 2, "sar_edge": t.sar_edge - 0.10},
        3: {"psnr": t.psnr + 0.5, "ssim": t.ssim + 0.04, "sam_deg": t.sam_deg - 0.5, "sar_edge": t.sar_edge - 0.02},
    }
    study = optuna.create_study(directions=list(DIRECTIONS))
    lr = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    for v in values.values():
        study.add_trial(optuna.trial.create_trial(values=[v[m] for m in OBJECTIVES], params={"lr": 1e-3},
                                                  distributions=lr))  # fmt: skip
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, system_attrs={"fail_reason": "OOM"}))
    with mlflow.start_run(experiment_id=tracking.setup(cfg.mlflow)) as parent:
        pass
    study.set_user_attr(PARENT_RUN, parent.info.run_id)

    summary = summarise(cfg, study, register=False)

    assert _front(values) == {0, 1, 2} and _winner(values, t) == 1  # the cases this test is made of
    assert summary["best_trial"] == 1 and summary["best"] == values[1]
    assert (summary["trials"], summary["complete"], summary["failed"], summary["pareto"]) == (5, 4, 1, 3)
    _assert_tables(tmp_path / "sweep", values, {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE", 3: "COMPLETE", 4: "FAIL"})
    logged = mlflow.MlflowClient().get_run(parent.info.run_id)
    assert logged.data.tags["best_trial"] == "1"
    assert {m: logged.data.metrics[f"best.{m}"] for m in OBJECTIVES} == values[1]


def test_sweep_pareto_mlflow_and_registration(tmp_path, stores, one_thread):
    """A 2-trial study: named objectives, named nested MLflow runs under one parent, each trial linked to its run, the
    Pareto front on disk, the trial the winner rule picks scored on the test split and registered with those scores."""
    import json

    import mlflow
    import optuna

    from gac.io import tracking
    from gac.mlops.sweep import RUN_ID, RUN_URL

    storage = f"sqlite:///{tmp_path}/optuna.db"
    params = sweep_params(tmp_path, stores, storage, n_trials=2)
    from gac.cli import main

    assert main(sweep_cmd(params)[3:]) == 0  # `python -m gac sweep …` in this process, on one thread (`one_thread`)
    trials = trials_of(storage)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(len(t.values) == 4 for t in trials)
    # optuna-dashboard and trials_dataframe name the objectives instead of "Objective 0…3"
    assert optuna.load_study(study_name="test-study", storage=storage).metric_names == list(OBJECTIVES)
    values = {t.number: dict(zip(OBJECTIVES, t.values, strict=True)) for t in trials}
    _assert_tables(tmp_path / "sweep", values, {t.number: "COMPLETE" for t in trials})
    assert (tmp_path / "sweep/pareto.png").is_file()
    winner = _winner(values, Params().promote.targets)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["best_trial"] == winner and summary["best"] == values[winner]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("gac")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == tracking.run_name("sweep", "study test-study (stage2)")]
    assert len(parents) == 1 and parents[0].data.tags["optuna.study"] == "test-study"
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(r.info.run_name for r in children.values()) == [tracking.run_name("stage2", f"trial {n}")
                                                                  for n in (0, 1)]  # fmt: skip
    for t in trials:  # each trial names its run and links to its page in the MLflow UI; the run names the trial
        run = children[t.user_attrs[RUN_ID]]
        page = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
        assert t.user_attrs[RUN_URL] == page
        assert run.info.run_name == tracking.run_name("stage2", f"trial {t.number}")
        tags = run.data.tags
        assert (tags["optuna.study"], tags["optuna.trial"], tags["optuna.state"]) == ("test-study", str(t.number),
                                                                                      "COMPLETE")  # fmt: skip
        assert {"psnr", "ssim", "sam_deg", "sar_edge", "train/loss"} <= set(run.data.metrics)
        assert {m: run.data.metrics[m] for m in OBJECTIVES} == values[t.number]
        assert {"lora_rank", "lr"} <= set(run.data.params)
        assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"catalog", "opt_v1"}
    alias = client.get_model_version_by_alias("gac-stage2", "challenger")
    assert alias.tags["optuna.trial"] == str(winner)
    best = trials[winner]
    # Its eval.* tags are the model's test-split scores: the sweep's own scoring, rerun here on the sweep's one thread
    # and batches, gives them to the last bit.
    assert alias.tags["eval.split"] == "test"
    scores = _scored_by_the_sweep(best.user_attrs["model_dir"], stores, "test")
    own = {k: scores[k] for k in [*OBJECTIVES, "tiles"]}
    assert {k: float(alias.tags[f"eval.{k}"]) for k in [*OBJECTIVES, "tiles"]} == own
    assert summary["best_test"] == own
    # ...and what `gac evaluate` gives a cache written by that model, up to the ±1 DN its other thread count and
    # batches may round differently.
    evaluated, tolerance = _scored_like_evaluate(best.user_attrs["model_dir"], stores, tmp_path / "opt_v2")
    assert evaluated["tiles"] == own["tiles"]
    for key in OBJECTIVES:
        assert abs(own[key] - evaluated[key]) <= tolerance[key], (key, own[key], evaluated[key], tolerance[key])


def _scored_by_the_sweep(model_dir: str, stores: dict[str, str], split: str) -> dict[str, float]:
    """:func:`gac.mlops.sweep.score` of the saved model on ``split``, with the sweep's exclusions."""
    from gac.mlops.sweep import score
    from gac.training.export import load_model

    stage, _, model = load_model(model_dir)
    return score(stage, model, stores["catalog"], stores["opt_v1"], split=split, exclude=tuple(Params().data.exclude))


def _scored_like_evaluate(model_dir: str, stores: dict[str, str], cache: Path):
    """The test-split means ``gac evaluate`` reports for Stage 1+2 (the model writes its cache, evaluation's own tile
    selection picks the scored tiles, :func:`gac.evaluation.metrics.per_tile` scores the cache's DN against the
    catalog's), and how far each objective's mean can move when the prediction moves by ±1 DN on any pixels.

    That bound is first order: a prediction off by at most 1 DN = ``1 / DN_SCALE`` reflectance per value moves a
    metric by at most ``‖∇metric‖₁ / DN_SCALE`` (its gradient over every predicted value, here on these very tiles).
    """
    import torch

    from gac.evaluation import metrics
    from gac.evaluation.ablation import Cache, common_tiles
    from gac.inference.refine import write_cache
    from gac.training.export import load_model

    stage, _, model = load_model(model_dir)
    write_cache(stage, model, stores["catalog"], stores["opt_v1"], cache, progress=False)
    catalog, opt_v2 = ShardStore(stores["catalog"]), ShardStore(cache)
    rows, _, _ = common_tiles(catalog, {"stage2": Cache("stage2", opt_v2, {})}, "test", Params().data.exclude)
    pred = torch.from_numpy(opt_v2.read("opt", opt_v2.rows_for(rows["patch_id"])).astype(np.float32))
    truth = torch.from_numpy(catalog.read("s2", rows).astype(np.float32))
    s1 = torch.from_numpy(catalog.read("s1", rows))
    values = metrics.per_tile(pred, truth, s1)
    fns = {"psnr": metrics.psnr, "ssim": metrics.ssim, "sam_deg": metrics.sam_deg,
           "sar_edge": lambda p, t: metrics.sar_edge_agreement(p, t, s1)}  # fmt: skip
    tolerance = {}
    for key, fn in fns.items():
        refl = metrics.to_reflectance(pred).requires_grad_()
        (grad,) = torch.autograd.grad(fn(refl, metrics.to_reflectance(truth)).double().mean(), refl)
        tolerance[key] = float(grad.abs().double().sum()) / metrics.DN_SCALE
    return {k: float(v.mean()) for k, v in values.items()} | {"tiles": len(rows)}, tolerance


def test_kill_and_continue(tmp_path, stores):
    """Kill a sweep mid-trial, rerun once Optuna sees the dead worker's heartbeat as stale: the killed trial is
    recorded FAIL, not lost and not repeated under its number, and the budget is completed."""
    import optuna

    storage = f"sqlite:///{tmp_path}/optuna.db"
    params = sweep_params(tmp_path, stores, storage, n_trials=2)
    proc = subprocess.Popen(sweep_cmd(params, "--no-register"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    try:  # kill once the first trial is training (its checkpoint folder appears)
        while not (tmp_path / "sweep/trial-0000/checkpoints").is_dir():
            assert proc.poll() is None, f"the sweep ended (rc {proc.returncode}) before its first trial was killed"
            assert time.monotonic() < deadline, "the first trial did not start training in time"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.monotonic()
    # the same heartbeat settings as the sweep: Optuna's own test of staleness, read without failing anything
    rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    study_id = rdb.get_study_id_from_name("test-study")
    (killed,) = rdb.get_all_trials(study_id, deepcopy=False)
    assert killed.state == optuna.trial.TrialState.RUNNING  # the kill landed mid-trial
    killed_id = rdb.get_trial_id_from_study_id_trial_number(study_id, killed.number)
    # stale GRACE_S after its last heartbeat, which came before the kill (HEARTBEAT_S more for the database clock's
    # whole seconds and this loop's period)
    while True:
        asked_at = time.monotonic()
        if killed_id in rdb._get_stale_trial_ids(study_id):
            break
        assert asked_at < killed_at + GRACE_S + HEARTBEAT_S, "the killed trial's heartbeat did not go stale"
        time.sleep(0.5)
    killpoint.rerun(sweep_cmd(params, "--no-register")[3:])  # `python -m gac sweep …` again, in this process
    trials = trials_of(storage)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 2
    assert states[0] == "FAIL"  # the killed one, not lost and not repeated under its number
    assert len({t.number for t in trials}) == len(trials)
