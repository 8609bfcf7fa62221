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
from gac.store import ShardStore

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
    """A 2-trial study: nested MLflow runs under one parent, a Pareto front on disk, the best trial registered."""
    import mlflow

    storage = f"sqlite:///{tmp_path}/optuna.db"
    params = _params(tmp_path, stores, storage, n_trials=2)
    done = subprocess.run(_sweep_cmd(params), env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(storage)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(len(t.values) == 4 for t in trials)
    assert (tmp_path / "sweep/pareto.csv").is_file() and (tmp_path / "sweep/pareto.png").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("gac")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name.startswith("sweep:test-study · workspace @ ")]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["0", "1"]
    assert all({"psnr", "ssim", "sam_deg", "sar_edge", "train/loss"} <= set(r.data.metrics) for r in children)
    assert all("lora_rank" in r.data.params and "lr" in r.data.params for r in children)
    alias = client.get_model_version_by_alias("gac-stage2", "challenger")
    assert alias.tags["optuna.trial"] in {"0", "1"}
    best = trials[int(alias.tags["optuna.trial"])]
    assert float(alias.tags["eval.psnr"]) == pytest.approx(best.values[0])  # promote can judge it
    assert alias.tags["eval.split"] == "validation"


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
    time.sleep(12)  # longer than gac.sweep.GRACE_S: the dead worker's heartbeat is stale
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
