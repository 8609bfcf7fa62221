"""The Optuna sweep: real studies on SQLite and on a PostgreSQL server this module starts, real training per trial.

Trials are made cheap (1–2 optimizer steps on 2 tiles), not fake: each one trains through the stage's own code.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gac.config import CatalogParams, Params
from gac.data import synthetic
from gac.data.catalog import build
from gac.io.store import ShardStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """A catalog of synthetic tiles and an opt_v1 cache standing in for Stage 1's.

    opt_v1 is the truth blurred and offset (Stage 1's own tests cover TerraMind generation); the sweep only needs a
    cache in the real format to train on.
    """
    tmp = tmp_path_factory.mktemp("sweep-data")
    synthetic.generate(tmp / "raw", 9, seed=3)
    catalog = build(CatalogParams(out=str(tmp / "catalog"), workers=0), tmp / "raw", progress=False)
    assert catalog.tiles == 9
    cat = ShardStore(tmp / "catalog")
    s2 = cat.read("s2").astype(np.float32)
    degraded = (0.5 * s2 + 0.5 * s2.mean(axis=(2, 3), keepdims=True) + 150).clip(0, 65535).astype(np.uint16)
    opt = ShardStore(tmp / "opt_v1")
    opt.write_shard("00000", cat.index.drop(columns=["shard", "row"]), {"opt": degraded})
    opt.finalize()
    return {"catalog": str(tmp / "catalog"), "opt_v1": str(tmp / "opt_v1")}


def _params(tmp: Path, stores: dict[str, str], storage: str, n_trials: int) -> Path:
    raw = Params().model_dump()
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "artifact_location": str(tmp / "mlartifacts"),
                     "experiment": "gac"}  # fmt: skip
    raw["catalog"]["out"] = stores["catalog"]
    raw["stage1"]["out"] = stores["opt_v1"]
    train = raw["stage2"]["train"]
    train.update(max_steps=1, batch_size=2, max_tiles=2, val_every_n_steps=1, save_every_n_steps=1, epochs=1)
    raw["stage2"]["img_size"] = 128
    raw["sweep"].update(storage=storage, n_trials=n_trials, out=str(tmp / "sweep"), study="test-study")
    raw["sweep"]["space"]["lora_rank"] = [2, 4]
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sweep_cmd(params: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gac", "--params", str(params), "sweep", "--metrics", str(params.parent / "s.json"),
            *extra]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GAC_PROGRESS": "0"}


def _trials(storage: str, study: str = "test-study"):
    import optuna

    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def test_sweep_pareto_mlflow_and_registration(tmp_path, stores):
    """A 2-trial study: named objectives, named nested MLflow runs under one parent, each trial linked to its run, a
    Pareto front on disk, the best trial scored on the test split and registered with those scores."""
    import json

    import mlflow
    import optuna

    from gac.io import tracking
    from gac.mlops.sweep import OBJECTIVES, RUN_ID, RUN_URL

    storage = f"sqlite:///{tmp_path}/optuna.db"
    params = _params(tmp_path, stores, storage, n_trials=2)
    done = subprocess.run(_sweep_cmd(params), env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(storage)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(len(t.values) == 4 for t in trials)
    # optuna-dashboard and trials_dataframe name the objectives instead of "Objective 0…3"
    assert optuna.load_study(study_name="test-study", storage=storage).metric_names == list(OBJECTIVES)
    assert (tmp_path / "sweep/pareto.csv").is_file() and (tmp_path / "sweep/pareto.png").is_file()
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
        assert run.data.metrics["psnr"] == pytest.approx(t.values[0])
        assert {"lora_rank", "lr"} <= set(run.data.params)
        assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"catalog", "opt_v1"}
    alias = client.get_model_version_by_alias("gac-stage2", "challenger")
    assert alias.tags["optuna.trial"] in {"0", "1"}
    best = trials[int(alias.tags["optuna.trial"])]
    # Its eval.* tags are test-split scores, as `gac evaluate` would give a cache written by that model
    assert alias.tags["eval.split"] == "test"
    expected = _scored_like_evaluate(best.user_attrs["model_dir"], stores, tmp_path / "opt_v2")
    for key in OBJECTIVES:
        assert float(alias.tags[f"eval.{key}"]) == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert float(alias.tags["eval.tiles"]) == expected["tiles"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["best_test"]["psnr"] == pytest.approx(expected["psnr"], rel=1e-5)
    assert children[best.user_attrs[RUN_ID]].data.metrics["psnr"] == pytest.approx(best.values[0])  # validation


def _scored_like_evaluate(model_dir: str, stores: dict[str, str], cache: Path) -> dict[str, float]:
    """The test-split means ``gac evaluate`` reports for Stage 1+2: the model writes its cache, evaluation's own tile
    selection picks the scored tiles, :func:`gac.evaluation.metrics.per_tile` scores the cache's DN against the
    catalog's."""
    import torch

    from gac.evaluation import metrics
    from gac.evaluation.ablation import Cache, common_tiles
    from gac.inference.refine import write_cache
    from gac.training.export import load_model

    stage, _, model = load_model(model_dir)
    write_cache(stage, model, stores["catalog"], stores["opt_v1"], cache, progress=False)
    catalog, opt_v2 = ShardStore(stores["catalog"]), ShardStore(cache)
    rows, _, _ = common_tiles(catalog, {"stage2": Cache("stage2", opt_v2, {})}, "test", Params().data.exclude)
    pred = opt_v2.read("opt", opt_v2.rows_for(rows["patch_id"])).astype(np.float32)
    truth, s1 = catalog.read("s2", rows).astype(np.float32), catalog.read("s1", rows)
    values = metrics.per_tile(torch.from_numpy(pred), torch.from_numpy(truth), torch.from_numpy(s1))
    return {k: float(v.mean()) for k, v in values.items()} | {"tiles": len(rows)}


def test_kill_and_continue(tmp_path, stores):
    """Kill a sweep mid-trial, rerun: the killed trial is recorded FAIL with a reason, the budget is completed."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    params = _params(tmp_path, stores, storage, n_trials=2)
    proc = subprocess.Popen(_sweep_cmd(params, "--no-register"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once the first trial is running (its folder appears)
        if glob.glob(str(tmp_path / "sweep/trial-0000/checkpoints")):
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(12)  # longer than gac.mlops.sweep.GRACE_S: the dead worker's heartbeat is stale
    again = subprocess.run(_sweep_cmd(params, "--no-register"), env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _trials(storage)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 2
    assert states[0] == "FAIL"  # the killed one, not lost and not repeated under its number
    assert len({t.number for t in trials}) == len(trials)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} not found: `make test` installs the postgresql package")
    return found


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (run as the postgres user when the tests run as root)."""
    data = Path(tempfile.mkdtemp(prefix="gac-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)  # fmt: skip
    port = _free_port()
    server = subprocess.Popen([*as_user, _pg_bin("postgres"), "-D", str(data / "db"), "-h", "127.0.0.1",
                               "-p", str(port), "-k", str(data)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    import sqlalchemy

    for _ in range(100):
        try:
            sqlalchemy.create_engine(url).connect().close()
            break
        except Exception:
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_postgres_study(tmp_path, stores, postgres):
    """Two worker processes on one PostgreSQL study: exactly the budget, distinct numbers, both contributed."""
    params = _params(tmp_path, stores, postgres, n_trials=4)
    workers = [
        subprocess.Popen(
            _sweep_cmd(params, "--no-register"),
            env={**ENV, "GAC_WORKER": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=1500)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs[0][-2000:] + outputs[1][-2000:]
    trials = _trials(postgres)
    assert [t.state.name for t in trials].count("COMPLETE") == 4
    assert len(trials) == 4
    assert len({t.number for t in trials}) == 4
    assert {t.user_attrs.get("worker") for t in trials} == {"0", "1"}
