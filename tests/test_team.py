"""A team's set-up, for real on loopback: PostgreSQL, moto's S3 and an MLflow server with proxied artifacts
(:mod:`tools.servers`), and "hosts": folders that share nothing on disk (own working directory, ``HOME`` and caches,
no S3 credentials), whose processes meet only through the servers, as machines of a cluster do.

One two-host sweep is run per module (:func:`swept`); the tests then read what it left on the server, delete the
host that trained the winner, and go on from the others: load, promote, register, infer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sweeping
import yaml
from sweeping import ENV, sweep_cmd, sweep_params, trials_of

from gac.mlops import sweep
from tools import servers

pytestmark = pytest.mark.slow
stores = sweeping.stores  # the module-scoped fixture
STUDY = "test-study"
#: Loose targets: the tests are about who promotes what across hosts, not about a model's quality.
TARGETS = {"psnr": 1.0, "ssim": -1.0, "sam_deg": 180.0, "sar_edge": 1.0}


@dataclass
class Host:
    """A machine of the team: its folder (working directory and ``HOME``), params and environment."""

    folder: Path
    params: Path
    env: dict[str, str]

    def run(self, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout)

    def gac(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gac", "--params", str(self.params), *args]


def make_host(root: Path, name: str, team: servers.Team, stores: dict[str, str] | None = None) -> Host:
    """A host with its own copy of the data (when given) and the params a user there would write: the default
    (embedded SQLite) MLflow section, which ``MLFLOW_TRACKING_URI`` overrides; no S3 keys (the server proxies)."""
    folder = root / name
    folder.mkdir(parents=True)
    local = {}
    for key, path in (stores or {}).items():
        local[key] = str(shutil.copytree(path, folder / "data" / key))
    params = sweep_params(folder, local or {"catalog": "artifacts/catalog", "opt_v1": "artifacts/opt_v1"},
                          team.optuna_storage, n_trials=2)  # fmt: skip
    raw = yaml.safe_load(params.read_text())
    raw["mlflow"] = {"tracking_uri": "sqlite:///mlruns/mlflow.db", "artifact_location": "mlruns/artifacts"}
    raw["promote"]["targets"] = TARGETS
    raw["catalog"].update(max_tiles=3, workers=0)
    raw["stage1"].update(timesteps=1, img_size=128, device="cpu")
    params.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in ENV.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= {"HOME": str(folder), "XDG_CACHE_HOME": str(folder / ".cache"), "GAC_WORKER": name, **team.host_env}
    return Host(folder, params, env)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    with servers.team(tmp_path_factory.mktemp("team")) as t:
        yield t


@pytest.fixture(scope="module")
def swept(tmp_path_factory, team, stores):
    """Two workers, one per host, run one study (2 trials) at once; the winner's host is then deleted.

    Yields the workers' outputs, the winner's trial, its host's name, the surviving host and the winner's output
    on :func:`tile` computed in this process from its model folder before the folder went."""
    from gac.training.export import apply, load_model

    root = tmp_path_factory.mktemp("hosts")
    hosts = {name: make_host(root, name, team, stores) for name in ("A", "B")}
    workers = {n: subprocess.Popen(sweep_cmd(h.params), cwd=h.folder, env=h.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for n, h in hosts.items()}  # fmt: skip
    outputs = {n: w.communicate(timeout=1500)[0] for n, w in workers.items()}
    assert all(w.returncode == 0 for w in workers.values()), outputs
    trials = trials_of(team.optuna_storage, STUDY)
    best = trials[json.loads((hosts["A"].folder / "s.json").read_text())["best_trial"]]
    trained_on = next(n for n, h in hosts.items() if best.user_attrs["model_dir"].startswith(str(h.folder)))
    stage, _, model = load_model(best.user_attrs["model_dir"])
    x = tile()
    import torch

    with torch.inference_mode():
        expected = apply(stage, model, torch.from_numpy(x["s1"]), torch.from_numpy(x["opt"])).numpy()
    shutil.rmtree(hosts[trained_on].folder)
    survivor = hosts["B" if trained_on == "A" else "A"]
    yield {"outputs": outputs, "trials": trials, "best": best, "deleted": trained_on, "survivor": survivor,
           "expected": expected, "hosts": hosts, "root": root}  # fmt: skip


def tile() -> dict[str, np.ndarray]:
    """One tile of per-pixel noise (σ⁰ dB, reflectance): every pixel differs."""
    rng = np.random.default_rng(0)
    return {"s1": rng.uniform(-25.0, 0.0, (1, 2, 120, 120)).astype(np.float32),
            "opt": rng.uniform(0.0, 0.4, (1, 12, 120, 120)).astype(np.float32)}  # fmt: skip


LOAD = """
import sys, numpy as np, mlflow
model = mlflow.pyfunc.load_model("models:/gac-stage2@challenger")
with np.load(sys.argv[1]) as x:
    np.save(sys.argv[2], model.predict({k: x[k] for k in ("s1", "opt")}))
"""


def test_two_hosts_share_one_study_one_parent_run_and_register_the_winner_once(team, swept):
    """Every trial's run is on the server under the study's one parent run; exactly one version is registered
    (the second worker finds it); no host wrote a local store; the other host loads and runs the winner after the
    host that trained it is gone."""
    from mlflow import MlflowClient

    client = MlflowClient(team.tracking_uri)
    trials = swept["trials"]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # exactly the budget, nothing failed
    assert [t.number for t in trials] == [0, 1]
    assert sorted(t.user_attrs["worker"] for t in trials) == ["A", "B"]  # one trial on each host
    experiment = client.get_experiment_by_name("gac")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied: no client needs S3 keys
    runs = client.search_runs([experiment.experiment_id], f"tags.`optuna.study` = '{STUDY}'")
    parents = [r for r in runs if r.data.tags.get("gac.stage") == "sweep"]
    assert len(parents) == 1
    parent = parents[0].info.run_id
    print(f"server {team.tracking_uri}: parent run {parent} ({parents[0].info.run_name})")
    for t in trials:
        run = client.get_run(t.user_attrs[sweep.RUN_ID])
        print(f"  trial {t.number} on host {t.user_attrs['worker']}: run {run.info.run_id} ({run.info.run_name}), "
              f"parent {run.data.tags['mlflow.parentRunId']}, artifacts {run.info.artifact_uri}")  # fmt: skip
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["gac.tracking_uri"] == team.tracking_uri
        assert set(sweep.OBJECTIVES) <= set(run.data.metrics)
    versions = client.search_model_versions(f"name = 'gac-stage2' and tags.`optuna.study` = '{STUDY}'")
    assert len(versions) == 1, [v.version for v in versions]
    assert client.get_model_version_by_alias("gac-stage2", "challenger").version == versions[0].version
    assert versions[0].tags["optuna.trial"] == str(swept["best"].number)
    print(f"registered: gac-stage2 version {versions[0].version} @challenger, trial {versions[0].tags['optuna.trial']}"
          f", source {versions[0].source}")  # fmt: skip
    once = [n for n, out in swept["outputs"].items() if "registered by another worker" in out]
    assert len(once) == 1, swept["outputs"]
    survivor = swept["survivor"]
    assert not (survivor.folder / "mlruns").exists() and not (survivor.folder / "mlflow.db").exists()
    assert not (swept["root"] / swept["deleted"]).exists()
    np.savez(survivor.folder / "x.npz", **tile())
    done = survivor.run([sys.executable, "-c", LOAD, "x.npz", "y.npy"])
    assert done.returncode == 0, done.stderr[-3000:]
    from gac.evaluation.metrics import DN_SCALE

    got = np.load(survivor.folder / "y.npy")
    worst = float(np.abs(got - swept["expected"]).max())
    print(f"host {swept['deleted']} (trained the winner) deleted; host {survivor.folder.name} loaded "
          f"models:/gac-stage2@challenger and predicted {got.shape}: max |difference| {worst:.2e} from the trained "
          f"model's own output")  # fmt: skip
    assert got.shape == swept["expected"].shape
    assert worst <= 1 / DN_SCALE  # within one stored DN


def on_host(host: Host, monkeypatch) -> None:
    """This process as a process of ``host``: its folder, ``HOME`` and environment (no S3 keys), until the test ends."""
    monkeypatch.chdir(host.folder)
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    for key, value in host.env.items():
        monkeypatch.setenv(key, value)


def register_stage3(host: Host, stage2_version: str, monkeypatch) -> str:
    """On ``host`` (its folder, ``HOME`` and environment, in this process: a registration proves nothing more in a
    process of its own), register an untrained Stage 3 on Stage 2 ``stage2_version``'s output, tagged with its
    test-split scores (on opt_v1 as its input: the test is about who promotes what, not about the model)."""
    import mlflow
    import yaml as yml

    from gac.config import Params, Stage3Params
    from gac.io import tracking
    from gac.mlops import registry
    from gac.mlops.model_card import tag_evaluation
    from gac.models.grounding import build_grounder
    from gac.training.export import save_model

    on_host(host, monkeypatch)
    cfg = Params.model_validate(yml.safe_load(host.params.read_text()))
    section = Stage3Params(img_size=128)
    model = build_grounder(section).eval()
    save_model("stage3", section, model, host.folder / "m3")
    test = sweep.score("stage3", model, cfg.catalog.out, cfg.stage1.out, split="test")
    with tracking.start_run(cfg.mlflow, "stage3"):
        version = registry.log_and_register(str(host.folder / "m3"), section, {k: test[k] for k in ("psnr", "ssim")},
                                            tags={"gac.stage2_model": "gac-stage2",
                                                  "gac.stage2_version": stage2_version})  # fmt: skip
    tag_evaluation(mlflow.MlflowClient(), "gac-stage3", version, test, {"split": "test", "source": "opt_v1 as input"})
    return version


def test_promotes_from_two_hosts_at_once_promote_once_and_infer_runs_the_champion_pair_elsewhere(
    team, swept, stores, synthetic_root, monkeypatch, capsys
):
    """Two hosts promote host A's registration at once: one moves ``champion``, the other decides against it, and
    both record their decision on the server. A third host registers a Stage 3 on that champion and promotes the
    pair; the first host's ``gac infer`` then runs the pair from the server."""
    from mlflow import MlflowClient

    client = MlflowClient(team.tracking_uri)
    b = swept["survivor"]
    c = make_host(swept["root"], "C", team, stores)
    challenger = client.get_model_version_by_alias("gac-stage2", "challenger").version
    runs = {h.folder.name: subprocess.Popen(h.gac("promote", "--model", "gac-stage2", "--metrics", "p.json"),
                                            cwd=h.folder, env=h.env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True) for h in (b, c)}  # fmt: skip
    outputs = {n: p.communicate(timeout=900)[0] for n, p in runs.items()}
    assert all(p.returncode == 0 for p in runs.values()), outputs
    decisions = {h.folder.name: json.loads((h.folder / "p.json").read_text())["gac-stage2"] for h in (b, c)}
    assert sorted(d["promoted"] for d in decisions.values()) == [False, True], decisions
    assert all(d["candidate"] == challenger for d in decisions.values())
    assert client.get_model_version_by_alias("gac-stage2", "champion").version == challenger
    experiment = client.get_experiment_by_name("gac").experiment_id
    recorded = client.search_runs([experiment], "tags.`gac.stage` = 'promote'")
    assert len(recorded) == 2 and all(r.info.status == "FINISHED" for r in recorded)
    said = sorted(
        json.loads(
            client.download_artifacts(r.info.run_id, "promote.json", str(c.folder))
            and (c.folder / "promote.json").read_text()
        )["gac-stage2"]["promoted"]
        for r in recorded
    )
    assert said == [False, True]  # each host's decision is on the server
    for host in (b, c):
        assert not (host.folder / "mlruns").exists()

    stage3 = register_stage3(c, challenger, monkeypatch)
    done = c.run(c.gac("promote", "--model", "gac-stage3", "--metrics", "p3.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((c.folder / "p3.json").read_text())["gac-stage3"]["promoted"], done.stdout
    assert client.get_model_version_by_alias("gac-stage3", "champion").version == stage3
    shutil.copytree(synthetic_root, b.folder / "region")
    from gac.cli import main

    on_host(b, monkeypatch)  # `gac infer` in this process, as a process of host B
    code = main(["--params", str(b.params), "infer", "--data-dir", "region", "--output-dir", "out", "--no-geotiff"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "Processed 3 of 3 tiles, Errors 0, Output dir out" in printed.out
    assert (b.folder / "out" / "opt_v3").is_dir()


def test_a_stage_run_with_mlflow_tracking_uri_set_writes_nothing_locally_and_its_artifacts_reach_s3(
    team, tmp_path, monkeypatch
):
    """The committed params (SQLite under ``mlruns/``) with ``MLFLOW_TRACKING_URI`` pointing at the server: the run
    and its artifact are on the server, the artifact in the S3 bucket behind its proxy, and no ``mlruns/`` here."""
    import mlflow

    from gac.config import MlflowParams
    from gac.io import tracking

    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)  # the client has no S3 keys: the server proxies
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.tracking_uri)
    with tracking.start_run(MlflowParams(), "stage1") as run:
        mlflow.log_text("opt_v1 written", "notes/stage1.txt")
    assert list(tmp_path.iterdir()) == []
    got = mlflow.MlflowClient(team.tracking_uri).get_run(run.info.run_id)
    assert got.data.tags["gac.tracking_uri"] == team.tracking_uri
    listed = servers.s3_client(team.s3_env).list_objects_v2(Bucket=servers.ARTIFACT_BUCKET)
    keys = [o["Key"] for o in listed["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/stage1.txt") for k in keys), keys


def test_make_mlflow_server_prints_each_hosts_variables_serves_and_stops_on_ctrl_c(tmp_path):
    """What ``make mlflow-server`` runs (``python -m tools.servers``): it prints the exports, the printed server
    answers, and Ctrl-C stops everything it started."""
    import signal
    import urllib.request

    cmd = [sys.executable, "-m", "tools.servers", "--dir", str(tmp_path / "team"), "--port", str(servers.free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not lines or lines[-1] != "# serving until Ctrl-C\n":
            line = proc.stdout.readline()
            assert line, "".join(lines)  # it ended before serving
            lines.append(line)
        exports = dict(ln.removeprefix("export ").strip().split("=", 1) for ln in lines if ln.startswith("export"))
        assert set(exports) == {"MLFLOW_TRACKING_URI", *servers.S3_KEYS, "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"}
        with urllib.request.urlopen(f"{exports['MLFLOW_TRACKING_URI']}/health", timeout=10) as answer:
            assert answer.status == 200
        assert any("gac sweep --storage postgresql+psycopg2://" in line for line in lines)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        with pytest.raises(OSError):  # nothing left serving
            urllib.request.urlopen(f"{exports['MLFLOW_TRACKING_URI']}/health", timeout=5)
    finally:
        proc.kill()
        proc.wait()
