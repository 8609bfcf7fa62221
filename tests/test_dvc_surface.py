"""What a user reads through DVC: the training curves as plots, the default remote, and the sweep's committed lock.

The DVC commands run for real in temporary git + DVC repositories (never in the project's own folder, whose outputs
they would rewrite); the headline metrics and ``dvc plots show`` of the whole pipeline are checked where it runs,
in ``tests/test_experiments.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from gac.training.curves import CURVES, write_curves

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

#: A Lightning ``metrics.csv`` as ``CSVLogger`` writes it: a training row has blank validation cells and the other way
#: round. Step 3's training loss is NaN; its validation was scored twice (again after a resumed fit).
LIGHTNING_LOG = """epoch,step,train/loss,train/loss_l1,val/loss,val/psnr,val/ssim,val/sar_edge,val/selection
0,0,0.2,0.09,,,,,
0,1,0.19,0.08,,,,,
0,1,,,0.18,18.9,0.57,0.99,1.42
1,2,0.17,0.07,,,,,
1,3,nan,0.06,,,,,
1,3,,,0.17,19.2,0.58,0.98,1.40
1,3,,,0.165,19.3,0.59,0.97,1.38
"""


def dvc(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | GIT_ENV | {"PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert not check or done.returncode == 0, f"dvc {args}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def git_dvc_repo(path: Path) -> Path:
    """An empty git + DVC repository at ``path`` with the project's ``.dvc/config`` (cache links, default remote)."""
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    dvc(["init", "-q"], path)
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    return path


# -------------------------------------------------------------------------------------------- training curves


def test_each_curve_is_one_metric_without_blank_cells(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(LIGHTNING_LOG)
    rows = write_curves(tmp_path / "metrics.csv", tmp_path / "plots")
    assert sorted(p.stem for p in (tmp_path / "plots").iterdir()) == sorted(CURVES)
    train = pd.read_csv(tmp_path / "plots" / "train_loss.csv")
    assert train.to_dict("list") == {"step": [0, 1, 2], "loss": [0.2, 0.19, 0.17]}  # no blank, no NaN: nothing at 0
    val = pd.read_csv(tmp_path / "plots" / "val_loss.csv")
    assert val.to_dict("list") == {"step": [1, 3], "loss": [0.18, 0.165]}  # step 3 once: the value scored last
    psnr = pd.read_csv(tmp_path / "plots" / "val_psnr.csv")
    assert psnr.to_dict("list") == {"step": [1, 3], "psnr": [18.9, 19.3]}
    assert rows == {**dict.fromkeys(CURVES, 2), "train_loss": 3, "val_sam_deg": 0}
    assert (tmp_path / "plots" / "val_sam_deg.csv").read_text().strip() == "step,sam_deg"  # not logged: header only


def test_a_missing_log_still_writes_every_declared_file(tmp_path: Path) -> None:
    """DVC fails a stage whose declared output is missing: a training with nothing logged writes empty curves."""
    assert write_curves(tmp_path / "none.csv", tmp_path / "plots") == dict.fromkeys(CURVES, 0)
    assert all((tmp_path / "plots" / f"{stem}.csv").read_text().startswith("step,") for stem in CURVES)


def test_dvc_yaml_declares_every_curve_as_a_git_tracked_plot() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, number in (("stage2", 2), ("stage3", 3)):
        assert stages[stage]["cmd"].endswith(f" --plots plots/{stage}")
        plots = {path: props for entry in stages[stage]["plots"] for path, props in entry.items()}
        assert set(plots) == {f"plots/{stage}/{stem}.csv" for stem in CURVES}
        for stem, (_, name) in CURVES.items():
            props = plots[f"plots/{stage}/{stem}.csv"]
            assert props["cache"] is False and props["x"] == "step" and props["y"] == name, stem
            assert props["title"].startswith(f"Stage {number}: "), stem
    ignored = [line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert not [line for line in ignored if line.startswith("plots")]  # committed, like metrics/


# ----------------------------------------------------------------------------------------------- remote


def test_the_default_remote_is_outside_the_repo_and_push_pull_round_trip(tmp_path: Path) -> None:
    """``dvc push``/``dvc pull`` need no set-up: ``.dvc/config`` names a default local remote outside any clone."""
    repo = git_dvc_repo(tmp_path / "repo")
    assert dvc(["remote", "default"], repo).stdout.strip() == "local"
    url = dvc(["config", "remote.local.url"], repo).stdout.strip()
    where = Path(os.path.expanduser(url))
    assert where.is_absolute() and repo not in where.parents, url  # the same folder for every clone of one user
    # Here the remote goes to a temporary folder (config.local, as a user would point it at shared storage).
    dvc(["remote", "modify", "--local", "local", "url", str(tmp_path / "remote")], repo)
    (repo / "data").mkdir()
    (repo / "data" / "a.bin").write_bytes(os.urandom(4096))
    (repo / "data" / "b.txt").write_text("tile\n")
    before = {p.name: p.read_bytes() for p in (repo / "data").iterdir()}
    dvc(["add", "-q", "data"], repo)
    assert "pushed" in dvc(["push"], repo).stdout
    assert any((tmp_path / "remote").rglob("*")) and not (repo / "remote").exists()
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(["pull"], repo)
    assert {p.name: p.read_bytes() for p in (repo / "data").iterdir()} == before
    assert "in sync" in dvc(["status", "--cloud"], repo).stdout


# ------------------------------------------------------------------------------------------ the sweep's lock


def test_the_committed_sweep_lock_matches_todays_code_and_params(tmp_path: Path) -> None:
    """``sweeps/dvc.lock`` records the code and params the committed sweep ran with; a change to any of them must come
    with a rerun (``dvc repro sweeps/dvc.yaml``) and its new lock. The data dependencies (``artifacts/…``) are left
    out: a clone has them only after ``make repro``, and the data stages' own lock decides them."""
    repo = git_dvc_repo(tmp_path / "repo")
    spec = yaml.safe_load((ROOT / "sweeps" / "dvc.yaml").read_text())["stages"]["sweep"]
    copied = []
    for dep in spec["deps"]:
        src = ROOT / dep
        if dep.startswith("artifacts/"):
            continue
        assert src.exists(), f"sweeps/dvc.yaml depends on {dep}, which is not in the project"
        copied.append(dep)
        (repo / dep).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, repo / dep, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / dep)
    for name in ("params.yaml", "sweeps/dvc.yaml", "sweeps/dvc.lock"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    status = json.loads(dvc(["status", "--json", "sweeps/dvc.yaml"], repo).stdout or "{}")
    assert any(dep.startswith("gac/") for dep in copied), copied
    # its artifacts/ inputs are absent here, so DVC must report the stage: an empty report would compare nothing
    assert status.get("sweeps/dvc.yaml:sweep"), f"dvc status did not report the sweep stage: {status}"
    changed = {}
    for entry in status["sweeps/dvc.yaml:sweep"]:
        if isinstance(entry, dict):
            deps = entry.get("changed deps", {})
            changed |= {k: v for k, v in deps.items() if not k.startswith("artifacts/")}
    assert not changed, f"sweeps/dvc.lock is stale, rerun `dvc repro sweeps/dvc.yaml` and commit its lock: {changed}"
