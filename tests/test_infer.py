"""``gac infer``: the whole pipeline on new tiles, with every model source checked before any stage runs.

Models here are real GAC model folders (:func:`gac.training.export.save_model` of freshly built, random-init tiny
networks whose zero-initialised pixel heads are given random weights, so no stage returns its input) and real MLflow
registry entries on a SQLite store; the command runs in a subprocess, as a user runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from PIL import Image

from gac.config import Stage2Params, Stage3Params

ENV = os.environ | {"GAC_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
#: How far (in DN) a cache ``gac infer`` wrote may be from what the in-process model computes on the same tiles: both
#: run the same float32 network on the CPU (the workdir's params say so) and round to uint16 DN the same way
#: (gac.inference.engine.to_dn); another summation order (thread count) moves the float result by far less than a
#: DN (see test_registry.ONE_DN), which changes the rounded DN by at most 1 where it lies near a half.
ROUNDING_DN = 1


def gac(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gac", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900
    )


@pytest.fixture()
def workdir(tmp_path: Path, empty_mlflow_db: Path) -> Path:
    """A folder with a params.yaml (tiny, 1 diffusion step, at most 3 tiles) and an empty MLflow store."""
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    params = {
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "art")},
        "catalog": {"max_tiles": 3, "workers": 0},
        "stage1": {"timesteps": 1, "img_size": 128, "device": "cpu"},
        "stage2": {"cache": {"device": "cpu"}},  # where the in-process references run (no TF32 convolutions)
        "stage3": {"cache": {"device": "cpu"}},
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
    done = gac(["infer", "--data-dir", str(synthetic_root), "--output-dir", "out"], workdir)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("gac: error:")]
    assert len(lines) == 1, done.stderr
    # Stage 3 first: by default Stage 2 is the version gac-stage3@champion was trained on
    assert "--stage3-checkpoint: models:/gac-stage3@champion: gac-stage3 has no @champion" in lines[0]
    assert "gac-stage3@challenger (v1)" in lines[0]  # names what exists
    # "at once" is what did not happen, not a wall-clock limit (timings belong in benchmarks/): no stage ran
    assert not (workdir / "out").exists()


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
    done = gac(args, workdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert expected in done.stderr.strip().splitlines()[-1], done.stderr


def test_model_folders_run_the_whole_pipeline_on_a_bigearthnet_root_into_what_the_models_compute(
    workdir: Path, synthetic_root: Path, non_identity, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """opt_v2 and opt_v3 are what the in-process Stage 2 and Stage 3 models compute on the tiles' opt_v1 (resp.
    opt_v2) and S1, within :data:`ROUNDING_DN`; each moves its input by far more than that."""
    import torch

    from gac.errors import GacError
    from gac.models.grounding import build_grounder
    from gac.models.prithvi import build_refiner
    from gac.stages.infer import check_sources
    from gac.training.export import save_model

    s2, s3 = Stage2Params(img_size=128), Stage3Params(img_size=128, nll_weight=0.05)  # Stage 3 with a σ head
    torch.manual_seed(0)
    models = {"stage2": non_identity(build_refiner(s2), seed=2), "stage3": non_identity(build_grounder(s3), seed=3)}
    save_model("stage2", s2, models["stage2"].eval(), workdir / "m2")  # eval(): in place, the reference runs so too
    save_model("stage3", s3, models["stage3"].eval(), workdir / "m3")
    # a model folder of the other stage is refused before anything runs (in process: the one-line route from such a
    # GacError to stderr is test_every_kind_of_bad_source_is_one_line's, whose folder case fails in this same function)
    with pytest.raises(GacError, match=r"--stage2-checkpoint: \S+/m3: a stage3 model, expected a stage2 model"):
        check_sources({"stage2": str(workdir / "m3"), "stage3": str(workdir / "m3")})
    args = ["infer", "--data-dir", str(synthetic_root), "--output-dir", "out", "--stage2-checkpoint", "m2"]
    from gac.cli import main

    monkeypatch.chdir(workdir)  # in this process (the entry point's own behaviour: the one-line-error tests above)
    monkeypatch.setenv("GAC_PROGRESS", "0")
    code = main(["--params", "params.yaml", *args, "--stage3-checkpoint", "m3", "--save-visualizations", "1",
                 "--scenes"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "Processed 3 of 3 tiles, Errors 0, Output dir out\n" in printed.out
    from gac.io.store import ShardStore

    stores = {cache: ShardStore(workdir / "out" / cache) for cache in ("opt_v1", "opt_v2", "opt_v3")}
    ids = list(stores["opt_v1"].index["patch_id"])
    assert len(ids) == 3 and all(list(store.index["patch_id"]) == ids for store in stores.values())
    tifs = sorted((workdir / "out" / "geotiff").glob("*_opt_v3.tif"))  # every tile's, by default
    assert len(tifs) == 3
    with rasterio.open(tifs[0]) as src:  # the mean and, since Stage 3 has a σ head, its σ bands
        assert src.count == 24 and src.descriptions[12] == "B01_sigma" and src.crs is not None
        assert src.transform.a == 10.0
    (figure,) = (workdir / "out" / "figures").glob("*_compare.png")  # --save-visualizations 1
    with Image.open(figure) as img:  # the title says the models are random-init tiny ones, not trained ones
        title = img.text["Title"]
    assert "weights: opt_v1, opt_v2, opt_v3 random init — random-init weights (demo: not a trained model)" in title
    scenes = sorted((workdir / "out" / "scenes").glob("*.tif"))  # --scenes: the tiles' products as COGs
    assert (f"Scenes: {len(scenes)} Cloud-Optimized GeoTIFFs with σ bands of 3 opt_v3 tiles, one a scene in out/scenes"
            in printed.out)  # fmt: skip
    for path in scenes:  # the pixels and layout of a scene: tests/test_cog.py
        with rasterio.open(path) as src:
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.count == 24
    catalog = ShardStore(workdir / "out" / "catalog")
    s1 = torch.from_numpy(catalog.read("s1", catalog.rows_for(ids)).astype(np.float32))
    for stage, source, cache in (("stage2", "opt_v1", "opt_v2"), ("stage3", "opt_v2", "opt_v3")):
        given, written = stores[source].read("opt").astype(int), stores[cache].read("opt").astype(int)
        expected = computed(stage, models[stage], s1, given).astype(int)
        moved, worst = float(np.median(np.abs(expected - given))), int(np.abs(written - expected).max())
        assert moved > 20 * ROUNDING_DN, (stage, moved)  # the model is not the identity
        assert worst <= ROUNDING_DN, (stage, worst)
    # gac infer writes σ: opt_v3's is the in-process model's calibrated σ; opt_v2's model has no σ head, no σ
    from gac.inference.engine import to_dn
    from gac.training.export import apply_with_sigma

    opt_v2 = torch.from_numpy(stores["opt_v2"].read("opt").astype(np.float32)) / 10000
    with torch.inference_mode():
        sigma = apply_with_sigma("stage3", models["stage3"], s1, opt_v2.clamp(0, 1))[1]
    written = stores["opt_v3"].read("sigma").astype(int)
    assert np.abs(written - to_dn(sigma.numpy() * 10000).astype(int)).max() <= ROUNDING_DN
    assert not stores["opt_v2"].has("sigma")


def computed(stage: str, model, s1, opt_dn: np.ndarray) -> np.ndarray:
    """uint16 DN that ``model`` computes in this process from S1 dB and optical DN (what the cache writer does)."""
    import torch

    from gac.inference.engine import to_dn
    from gac.sensors import DN_SCALE
    from gac.training.export import apply

    opt = (torch.from_numpy(opt_dn.astype(np.float32)) / DN_SCALE).clamp(0, 1)
    with torch.inference_mode():
        return to_dn((apply(stage, model, s1, opt).float() * DN_SCALE).numpy())
