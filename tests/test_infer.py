"""``gac infer``: the whole pipeline on new tiles, with every model source checked before any stage runs.

Models here are real GAC model folders (:func:`gac.training.export.save_model` of freshly built, random-init tiny
networks) and real MLflow registry entries on a SQLite store; the command runs in a subprocess, as a user runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rasterio
import yaml

from gac.config import Stage2Params, Stage3Params

ENV = os.environ | {"GAC_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def gac(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "gac", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900
    )
    return done, time.perf_counter() - start


@pytest.fixture()
def workdir(tmp_path: Path, empty_mlflow_db: Path) -> Path:
    """A folder with a params.yaml (tiny, 1 diffusion step, at most 3 tiles) and an empty MLflow store."""
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    params = {
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "art")},
        "catalog": {"max_tiles": 3, "workers": 0},
        "stage1": {"timesteps": 1, "img_size": 128, "device": "cpu"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def register_challenger(workdir: Path, name: str) -> None:
    """A registered model with version 1 aliased @challenger only (what the sample pipeline leaves behind)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    client.create_registered_model(name)
    version = client.create_model_version(name, source=str(workdir / "nowhere"))
    client.set_registered_model_alias(name, "challenger", version.version)


def test_without_a_champion_it_fails_at_once_in_one_line(workdir: Path, synthetic_root: Path) -> None:
    register_challenger(workdir, "gac-stage2")
    register_challenger(workdir, "gac-stage3")
    done, seconds = gac(["infer", "--data-dir", str(synthetic_root), "--output-dir", "out"], workdir)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("gac: error:")]
    assert len(lines) == 1, done.stderr
    # Stage 3 first: by default Stage 2 is the version gac-stage3@champion was trained on
    assert "--stage3-checkpoint: models:/gac-stage3@champion: gac-stage3 has no @champion" in lines[0]
    assert "gac-stage3@challenger (v1)" in lines[0]  # names what exists
    assert seconds < 30, seconds
    assert not (workdir / "out").exists()  # nothing ran


@pytest.mark.parametrize(
    ("flag", "source", "expected"),
    [
        ("--stage3-checkpoint", "models:/gac-stage3@champion", "no registered model 'gac-stage3'"),
        ("--stage3-checkpoint", "models:/gac-stage2/7", "gac-stage2 has no version '7'"),
        ("--stage3-checkpoint", "no/such/folder", "not a models:/ URI or a GAC model folder"),
    ],
)
def test_every_kind_of_bad_source_is_one_line(workdir: Path, flag: str, source: str, expected: str) -> None:
    register_challenger(workdir, "gac-stage2")
    args = ["infer", "--data-dir", "x", "--stage2-checkpoint", "models:/gac-stage2@challenger", flag, source]
    done, _ = gac(args, workdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert expected in done.stderr.strip().splitlines()[-1], done.stderr


def test_model_folders_run_the_whole_pipeline_on_a_bigearthnet_root(workdir: Path, synthetic_root: Path) -> None:
    from gac.models.grounding import build_grounder
    from gac.models.prithvi import build_refiner
    from gac.training.export import save_model

    s2, s3 = Stage2Params(img_size=128), Stage3Params(img_size=128)
    save_model("stage2", s2, build_refiner(s2), workdir / "m2")
    save_model("stage3", s3, build_grounder(s3), workdir / "m3")
    wrong, _ = gac(["infer", "--data-dir", "x", "--stage2-checkpoint", "m3", "--stage3-checkpoint", "m3"], workdir)
    assert "--stage2-checkpoint: m3: a stage3 model, expected a stage2 model" in wrong.stderr
    args = ["infer", "--data-dir", str(synthetic_root), "--output-dir", "out", "--stage2-checkpoint", "m2"]
    done, _ = gac([*args, "--stage3-checkpoint", "m3", "--save-visualizations", "1"], workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Processed 3 of 3 tiles, Errors 0, Output dir out\n" in done.stdout
    from gac.io.store import ShardStore

    for cache in ("opt_v1", "opt_v2", "opt_v3"):
        assert len(ShardStore(workdir / "out" / cache).index) == 3
    tifs = sorted((workdir / "out" / "geotiff").glob("*_opt_v3.tif"))  # every tile's, by default
    assert len(tifs) == 3
    with rasterio.open(tifs[0]) as src:
        assert src.count == 12 and src.crs is not None and src.transform.a == 10.0
    assert len(list((workdir / "out" / "figures").glob("*_compare.png"))) == 1  # --save-visualizations 1
