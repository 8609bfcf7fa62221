"""The shell around the stages: a light CLI, the DVC pipeline in a real git repo, and the versioned sample."""

from __future__ import annotations

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


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def test_cli_help_imports_nothing_heavy():
    """``gac --help`` must be instant: building every subcommand's parser imports no torch/TerraTorch/MLflow."""
    code = (
        "import sys, gac.cli; gac.cli.build_parser(); "
        "heavy = {'torch', 'terratorch', 'mlflow', 'lightning', 'optuna', 'rasterio'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-m", "gac", "--help"], capture_output=True, text=True, check=True)
    for command in ("catalog", "stage1", "stage2", "stage3", "evaluate", "promote", "infer", "sweep"):
        assert command in helped.stdout


@pytest.fixture()
def dvc_repo(tmp_path, synthetic_root) -> Path:
    """A git + DVC repo holding the project's dvc.yaml, pipelines and library, with synthetic tiles as data/."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "pipelines", "gac"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "a")}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(synthetic_root, repo / "data")
    assert _run(["git", "init", "-q"], repo).returncode == 0
    assert _run(["dvc", "init", "-q"], repo).returncode == 0
    return repo


def test_dvc_repro_catalog_then_nothing_to_do(dvc_repo):
    """The project's catalog stage runs under ``dvc repro``; the second repro and ``dvc status`` find nothing to do."""
    first = _run(["dvc", "repro", "catalog"], dvc_repo)
    assert first.returncode == 0, first.stderr + first.stdout
    assert (dvc_repo / "artifacts/catalog/index.parquet").is_file()
    assert (dvc_repo / "dvc.lock").is_file()
    metrics = _run(["dvc", "metrics", "show", "--json"], dvc_repo)
    assert '"tiles"' in metrics.stdout
    second = _run(["dvc", "repro", "catalog"], dvc_repo)
    assert second.returncode == 0
    assert "didn't change, skipping" in second.stdout
    assert "Running stage" not in second.stdout
    status = _run(["dvc", "status", "catalog"], dvc_repo)
    assert "up to date" in status.stdout, status.stdout


def test_gac_catalog_on_another_root_leaves_git_and_dvc_status_clean(dvc_repo, tmp_path):
    """``gac catalog --data-dir OTHER --output-dir OTHER_OUT`` from the project root writes its metrics beside
    OTHER_OUT, never over the tracked ``metrics/catalog.json`` (which made ``dvc status`` report the stage modified)."""
    from gac.data.synthetic import generate

    shutil.copy(ROOT / ".gitignore", dvc_repo / ".gitignore")  # /data, /artifacts, … as in the project
    assert _run(["dvc", "repro", "catalog"], dvc_repo).returncode == 0
    assert _run(["git", "add", "-A"], dvc_repo).returncode == 0
    assert _run(["git", "commit", "-qm", "pipeline"], dvc_repo).returncode == 0
    tracked = (dvc_repo / "metrics/catalog.json").read_bytes()
    generate(tmp_path / "other", 3, seed=5)
    other_out = tmp_path / "other-catalog"
    done = _run([sys.executable, "-m", "gac", "catalog", "--data-dir", str(tmp_path / "other"), "--output-dir",
                 str(other_out), "--workers", "1"], dvc_repo)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Catalog: 3 tiles, 0 rejected" in done.stdout
    assert (dvc_repo / "metrics/catalog.json").read_bytes() == tracked
    assert '"tiles": 3' in (tmp_path / "other-catalog.metrics.json").read_text()  # beside its output folder
    assert _run(["git", "status", "--porcelain"], dvc_repo).stdout == ""
    status = _run(["dvc", "status", "catalog"], dvc_repo)  # the only stage run here
    assert "up to date" in status.stdout, status.stdout


def test_catalog_param_change_reruns_stage(dvc_repo):
    """A change to the stage's own params section makes DVC rerun it (params are real dependencies)."""
    assert _run(["dvc", "repro", "catalog"], dvc_repo).returncode == 0
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["catalog"]["max_tiles"] = 3
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "catalog" in _run(["dvc", "status", "catalog"], dvc_repo).stdout
    again = _run(["dvc", "repro", "catalog"], dvc_repo)
    assert "Running stage 'catalog'" in again.stdout
    assert '"tiles": 3' in (dvc_repo / "metrics/catalog.json").read_text()


def test_sample_matches_committed_data_dvc(tmp_path, sample_root):
    """The materialised sample is byte for byte what ``data.dvc`` records: ``dvc status`` is clean on a fresh clone."""
    repo = tmp_path / "clone"
    repo.mkdir()
    shutil.copy(ROOT / "data.dvc", repo / "data.dvc")
    shutil.copytree(sample_root, repo / "data")
    assert _run(["git", "init", "-q"], repo).returncode == 0
    assert _run(["dvc", "init", "-q"], repo).returncode == 0
    committed = (ROOT / "data.dvc").read_text()
    added = _run(["dvc", "add", "data"], repo)  # what `make data` does: fills the fresh clone's cache
    assert added.returncode == 0, added.stderr
    assert (repo / "data.dvc").read_text() == committed  # same bytes → same hash: nothing to commit
    status = _run(["dvc", "status", "data.dvc"], repo)
    assert "up to date" in status.stdout, status.stdout
