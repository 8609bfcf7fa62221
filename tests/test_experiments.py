"""``dvc exp run`` on the project's own pipeline: an experiment retrains what its change reaches, in MLflow runs of
its own, and continues a training its change cannot invalidate.

A real git + DVC repository in a temporary folder holds the project's ``dvc.yaml``, ``pipelines/`` and ``gac/`` with
small settings (synthetic tiles, 1 diffusion step, two-tile trainings) and its own MLflow store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
TRAIN = {"epochs": 2, "batch_size": 2, "max_tiles": 2, "val_every_n_steps": 1, "save_every_n_steps": 1, "patience": 5}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | GIT_ENV | {"PATH": f"{BIN}:{os.environ['PATH']}", "GAC_PROGRESS": "0"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=1800)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as a fresh git + DVC repo after ``dvc repro`` (data tracked by ``data.dvc``, a first commit), on
    9 synthetic tiles (3 per split: what experiments retrain and rescore, kept small since every stage runs 3 times)."""
    from gac.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("experiments")
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "pipelines", "gac", ".dvcignore"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(
            src, repo / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {})
        )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = "synthetic"
    params["mlflow"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "artifact_location": str(tmp / "mlartifacts")}
    params["catalog"]["workers"] = 0
    params["stage1"].update(timesteps=1, batch_size=4)
    for stage in ("stage2", "stage3"):
        params[stage]["train"].update(TRAIN)
    params["evaluate"] = {"n_visualize": 1}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate(repo / "data", n_tiles=9, seed=0)
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the project's cache links (hardlinks here)
    run(["dvc", "add", "-q", "data"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project"], repo)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "dvc repro"], repo)
    return repo


def at_baseline(repo: Path) -> Path:
    """The workspace as committed, whatever ``dvc exp run`` left in it (a run's outputs stay in the workspace): git's
    files back, then DVC's outputs from the cache, as a user returns to the baseline. Tests that read the workspace
    start here, so they pass in any order."""
    run(["git", "checkout", "--", "."], repo)
    run(["dvc", "checkout", "--force"], repo)
    return repo


def can_hardlink(folder: Path) -> bool:
    """Whether the file system of ``folder`` takes hard links (tried on a scratch file, removed again)."""
    probe = folder / ".hardlink-probe"
    probe.write_bytes(b"")
    try:
        os.link(probe, probe.with_name(probe.name + "-2"))
    except OSError:
        return False
    else:
        probe.with_name(probe.name + "-2").unlink()
        return True
    finally:
        probe.unlink()


def runs(repo: Path, stage: str, experiment: str) -> list:
    """MLflow runs of ``stage`` made in DVC experiment ``experiment``."""
    from mlflow import MlflowClient

    store = yaml.safe_load((repo / "params.yaml").read_text())["mlflow"]["tracking_uri"]
    c = MlflowClient(store)
    ids = [e.experiment_id for e in c.search_experiments()]
    query = f"tags.`gac.stage` = '{stage}' and tags.`gac.dvc_experiment` = '{experiment}'"
    return c.search_runs(ids, query)


def steps(repo: Path, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    store = yaml.safe_load((repo / "params.yaml").read_text())["mlflow"]["tracking_uri"]
    return sorted(m.step for m in MlflowClient(store).get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
def test_the_stage3_version_names_what_it_was_trained_on(repo: Path) -> None:
    """Lineage as data: the registered Stage 3 version's tags name the Stage 2 version whose opt_v2 it learnt from,
    Stage 1's weights and the content of the catalog and of its input cache."""
    from mlflow import MlflowClient

    from gac.io.provenance import read_provenance
    from gac.io.store import ShardStore

    at_baseline(repo)
    (base2,), (base3,) = runs(repo, "stage2", "workspace"), runs(repo, "stage3", "workspace")
    c = MlflowClient(yaml.safe_load((repo / "params.yaml").read_text())["mlflow"]["tracking_uri"])
    (v2,) = [v for v in c.search_model_versions("name = 'gac-stage2'") if v.run_id == base2.info.run_id]
    (v3,) = [v for v in c.search_model_versions("name = 'gac-stage3'") if v.run_id == base3.info.run_id]
    assert v3.tags["gac.stage2_model"] == "gac-stage2" and v3.tags["gac.stage2_version"] == str(v2.version)
    assert v3.tags["gac.stage1_weights"] == "random init"
    assert v3.tags["gac.catalog_sha256"] == ShardStore(repo / "artifacts" / "catalog").content_digest()
    assert v3.tags["gac.stage2_cache_sha256"] == ShardStore(repo / "artifacts" / "stage2" / "opt_v2").content_digest()
    assert v2.tags["gac.stage1_cache_sha256"] == ShardStore(repo / "artifacts" / "opt_v1").content_digest()
    # and the chain goes on: opt_v3's provenance carries the same lineage
    assert read_provenance(repo / "artifacts" / "stage3" / "opt_v3", "stage3")["lineage"]["gac.stage2_version"] == str(
        v2.version
    )


@pytest.mark.slow
def test_an_experiment_retrains_what_it_changes_and_continues_what_it_extends(repo: Path) -> None:
    at_baseline(repo)
    (base2,), (base3,) = runs(repo, "stage2", "workspace"), runs(repo, "stage3", "workspace")
    # .dvc/config links the workspace to the cache ("hardlink,copy"): where the file system can hardlink, the workspace
    # file *is* the cache's copy, else it is a copy of it
    linked = repo / "artifacts" / "catalog" / "shards" / "00000" / "s2.npy"
    digest = hashlib.md5(linked.read_bytes()).hexdigest()
    cached = repo / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    if can_hardlink(repo / ".dvc" / "cache"):
        assert os.path.samefile(linked, cached)
    else:
        assert cached.read_bytes() == linked.read_bytes()

    # up to Stage 3, what the experiments change (evaluate and promote would follow on a plain `dvc exp run`)
    run(["dvc", "exp", "run", "-n", "other-lr", "-S", "stage2.train.lr=0.002", "stage3"], repo)
    (lr2,), (lr3,) = runs(repo, "stage2", "other-lr"), runs(repo, "stage3", "other-lr")
    # Stage 2 *and* Stage 3 (whose input opt_v2 changed) trained again from step 0, each in a new run
    for new, old in ((lr2, base2), (lr3, base3)):
        assert new.info.run_id != old.info.run_id
        assert steps(repo, new.info.run_id)[0] == 0 and len(steps(repo, new.info.run_id)) >= 2
        assert "gac.resumed_from_run" not in new.data.tags
        assert "exp other-lr" in new.info.run_name and new.data.tags["gac.git_commit"] != "unknown"
    assert lr2.data.params["train.lr"] == "0.002"
    assert not list((repo / "artifacts").glob("stage*/checkpoints/last-v*.ckpt"))

    epochs = TRAIN["epochs"] + 1
    run(["dvc", "exp", "run", "-n", "more-epochs", "-S", f"stage3.train.epochs={epochs}", "stage3"], repo)
    assert runs(repo, "stage2", "more-epochs") == []  # nothing upstream changed
    (more3,) = runs(repo, "stage3", "more-epochs")
    assert more3.data.tags["gac.resumed_from_run"] == lr3.info.run_id  # continued, not restarted
    continued = steps(repo, more3.info.run_id)
    assert continued and continued[0] == steps(repo, lr3.info.run_id)[-1] + 1
    assert not list((repo / "artifacts").glob("stage*/checkpoints/last-v*.ckpt"))
    shown = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "other-lr" in shown and "more-epochs" in shown
    # the experiments' training curves are DVC outputs: `dvc plots diff` draws both in one plot
    diff = json.loads(run(["dvc", "plots", "diff", "other-lr", "more-epochs", "--json"], repo).stdout)
    (plot,) = diff["data"]["plots/stage3/val_psnr.csv"]
    assert {v["rev"] for v in plot["content"]["data"]["values"]} == {"other-lr", "more-epochs"}


def flatten(data: dict, prefix: str = "") -> set[str]:
    """The column names ``dvc metrics show`` makes of a metrics file (nested keys joined by dots)."""
    keys = set()
    for k, v in data.items():
        keys |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return keys


@pytest.mark.slow
def test_metrics_show_is_short_and_plots_show_draws_one_metric_per_curve(repo: Path) -> None:
    """``dvc metrics show`` prints one column per key of every metrics file: the files hold the headline figures (the
    sweep's, committed beside, counted in); ``dvc plots show`` draws every training curve without blank cells."""
    from gac.training.curves import CURVES

    at_baseline(repo)
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    columns = flatten(json.loads((ROOT / "metrics" / "sweep.json").read_text()))
    ((_, workspace),) = shown.items()  # the workspace only (its key is "" in DVC 3's JSON)
    for path, metrics in workspace["data"].items():
        assert "error" not in metrics, path
        columns |= flatten(metrics["data"])
    assert len(columns) <= 80, sorted(columns)
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    for stage in ("stage2", "stage3"):
        for stem, (_, name) in CURVES.items():
            (plot,) = plots[f"plots/{stage}/{stem}.csv"]
            values = plot["content"]["data"]["values"]
            assert values and all(v[name] not in ("", None) for v in values), (stage, stem)
    assert len([name for name in plots if name.startswith("Ablation")]) == 3
