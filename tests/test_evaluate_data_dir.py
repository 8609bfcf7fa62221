"""``gac evaluate --data-dir ROOT``: the trained pipeline scored on another BigEarthNet v2 root, beside the DVC outputs.

A small real DVC pipeline is run first, through the ``gac`` commands the stages call (catalog → Stage 1 → Stage 2
trained and registered ``@challenger`` → Stage 3 trained), on synthetic tiles as ``data/``. Then the command scores
that pipeline on *another* synthetic root (other seed, hence other tiles, countries and seasons) with Stage 2 from
the registry and Stage 3 from the pipeline's model folder, and must leave every pipeline output as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from gac.cli import main
from gac.evaluation.ablation import DETAILS, ROWS, headline
from gac.io.lock import lock_path

#: The other root: another seed than the pipeline's data, hence other tiles; what it holds is read from its metadata.
OTHER_SEED, OTHER_TILES = 11, 9
N_VISUALIZE = 2
TRAIN = ["--max-steps", "1", "--max-tiles", "2", "--batch-size", "2", "--val-every", "1", "--save-every", "1",
         "--accelerator", "cpu"]  # fmt: skip


def write_params(workdir: Path, store: Path) -> None:
    """A tiny, CPU, 1-diffusion-step ``params.yaml`` whose MLflow store lives outside ``workdir``."""
    params = {
        "data": {"root": "data", "source": "synthetic"},
        "mlflow": {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}", "artifact_location": str(store / "art")},
        "catalog": {"workers": 0},
        "stage1": {"timesteps": 1, "img_size": 128, "device": "cpu"},
        "evaluate": {"n_visualize": N_VISUALIZE},
    }
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


def scored_tiles(root: Path):
    """The tiles ``gac evaluate --data-dir root`` scores, from the root's metadata alone: the test split less the tiles
    ``data.exclude`` flags, with each tile's country and acquisition season."""
    from gac.config import Params
    from gac.data.metadata import acquisition, keep_unflagged, read_metadata

    meta = read_metadata(root)
    test = keep_unflagged(meta[meta["split"] == "test"], Params().data.exclude)
    return test.assign(season=[acquisition(pid)[1] for pid in test["patch_id"]])


def gac(*args: str) -> int:
    return main(["--params", "params.yaml", *args])


def snapshot(workdir: Path, skip: Path) -> dict[str, str]:
    """sha256 and mtime of every file under ``workdir`` outside ``skip``."""
    out = {}
    for path in sorted(workdir.rglob("*")):
        if path.is_file() and skip not in path.parents:
            out[str(path.relative_to(workdir))] = (
                f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mtime_ns}"
            )
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path):
    """The pipeline's outputs, a snapshot of them, and one ``gac evaluate --data-dir`` run on another root."""
    from gac.data import synthetic

    tmp = tmp_path_factory.mktemp("evaluate-data-dir")
    workdir, store = tmp / "project", tmp / "mlflow"
    workdir.mkdir()
    store.mkdir()
    shutil.copy(empty_mlflow_db, store / "mlflow.db")
    write_params(workdir, store)
    synthetic.generate(workdir / "data", 6, seed=3)  # the pipeline's own data: 2 tiles per split
    other = tmp / "elsewhere"
    synthetic.generate(other, OTHER_TILES, seed=OTHER_SEED)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setenv("GAC_PROGRESS", "0")
        assert gac("catalog") == 0
        assert gac("stage1") == 0
        assert gac("stage2", *TRAIN) == 0  # registered as gac-stage2 @challenger, writes opt_v2
        assert gac("stage3", *TRAIN, "--no-register", "--no-cache") == 0
        external = workdir / "artifacts" / "evaluate-external" / "elsewhere"  # the default output folder
        before = snapshot(workdir, external)
        assert gac("evaluate", "--data-dir", str(other), "--stage2-checkpoint", "models:/gac-stage2@challenger") == 0
        after = snapshot(workdir, external)
    return {"workdir": workdir, "store": store, "other": other, "out": external, "before": before, "after": after}


def test_metrics_have_every_row_and_both_kinds_of_group(world) -> None:
    expected = scored_tiles(world["other"])
    # what makes the groups worth testing: the other root's test tiles span several countries and seasons
    assert expected["country"].nunique() >= 2 and expected["season"].nunique() >= 2, "pick another OTHER_SEED"
    saved = json.loads((world["out"] / "evaluate" / DETAILS).read_text())
    assert json.loads((world["out"] / "evaluate.json").read_text()) == headline(saved)  # the headline, beside
    assert {"stage1", "stage1+2", "full", "baseline", "truth"} <= set(ROWS)
    for row in ROWS:
        assert saved[row]["tiles"] == len(expected), row
    for row in ("stage1", "stage1+2", "full", "baseline"):
        assert saved[row]["psnr"] is not None and saved[row]["sar_edge"] is not None, row
    for group in ("country", "season"):  # every group of the scored tiles, each with its tiles in every row
        tables, counts = saved["groups"][group], expected[group].value_counts().to_dict()
        assert {value: {row: r["tiles"] for row, r in t.items()} for value, t in tables.items()} == {
            value: dict.fromkeys(ROWS, n) for value, n in counts.items()
        }, group
    prov = saved["provenance"]
    assert prov["split"] == "test" and prov["tiles_evaluated"] == len(expected) and prov["data_source"] == "synthetic"
    assert prov["data_root"] == str(world["other"].resolve())
    assert prov["models"] == {"stage2": "models:/gac-stage2@challenger", "stage3": "artifacts/stage3/model"}
    assert prov["stages"]["stage2"]["model"] == "models:/gac-stage2@challenger"
    assert prov["stages"]["baseline"]["catalog"] == "artifacts/catalog"  # fitted on the pipeline's train tiles


def test_figures_geotiffs_and_caches_are_in_the_output_folder(world) -> None:
    import rasterio

    report = world["out"] / "evaluate"
    for kind in ("compare", "grounding", "attention"):
        assert len(list((report / "figures").glob(f"*_{kind}.png"))) == N_VISUALIZE, kind
    tifs = sorted((report / "geotiff").glob("*_opt_v3.tif"))
    assert len(tifs) == N_VISUALIZE
    with rasterio.open(tifs[0]) as src:
        assert src.count == 12 and src.crs is not None
    assert (report / "plots" / "ablation.csv").is_file() and (report / "plots" / "groups.csv").is_file()
    for cache in ("catalog", "opt_v1", "opt_v2", "opt_v3"):
        assert (world["out"] / "caches" / cache / "index.parquet").is_file(), cache


def test_the_dvc_pipelines_outputs_are_left_alone(world) -> None:
    # nothing outside the output folder was created or touched, but for the output folder's own lock file beside it
    lock = str(lock_path(world["out"]).relative_to(world["workdir"]))
    assert lock in world["after"]
    assert world["before"] == {k: v for k, v in world["after"].items() if k != lock}
    assert (world["workdir"] / "artifacts" / "stage2" / "model").is_dir()  # the pipeline did run
    assert not (world["workdir"] / "artifacts" / "evaluate").exists()
    assert not (world["workdir"] / "metrics" / "evaluate.json").exists()


def test_registered_versions_get_no_eval_tags_but_the_run_names_the_root(world) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{world['store'] / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias("gac-stage2", "challenger")
    assert not [k for k in version.tags if k.startswith("eval.")]  # gac promote compares only the pipeline's own
    saved = json.loads((world["out"] / "evaluate" / DETAILS).read_text())
    run = client.get_run(saved["provenance"]["mlflow_run_id"])
    assert run.data.tags["gac.data_root"] == str(world["other"].resolve())


# ------------------------------------------------------------------------------------ bad input: one line each


@pytest.fixture()
def project(tmp_path: Path, empty_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with params.yaml as cwd (no pipeline run) and a 2-tile root with train and validation only."""
    from gac.data import synthetic

    store = tmp_path / "mlflow"
    store.mkdir()
    shutil.copy(empty_mlflow_db, store / "mlflow.db")
    (tmp_path / "project").mkdir()
    write_params(tmp_path / "project", store)
    synthetic.generate(tmp_path / "small", 2, seed=1)
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path / "project"


def one_error_line(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert gac(*args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gac: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data-dir", "nowhere"], "--data-dir nowhere: no such folder"),
        (["--data-dir", "."], "--data-dir .: not a BigEarthNet v2 root (no metadata.parquet"),
        (["--data-dir", "../small", "--split", "test"], "no 'test' tiles (splits present: validation, train)"),
        (["--data-dir", "../small", "--output-dir", "artifacts/stage2/x"], "overlaps stage2.out (artifacts/stage2)"),
        (["--data-dir", "../small", "--output-dir", "../small/out"], "overlaps --data-dir (../small)"),
        (["--data-dir", "../small", "--metrics", "metrics/evaluate.json"], "the DVC pipeline's own metrics file"),
        (["--data-dir", "../small"], "--stage2-checkpoint: artifacts/stage2/model: not a models:/ URI or a GAC model "
                                     "folder (expected weights.safetensors, params.json) — the default"),
        (["--data-dir", "../small", "--stage2-checkpoint", "models:/gac-stage9@champion"],
         "--stage2-checkpoint: models:/gac-stage9@champion: no registered model 'gac-stage9'"),
        (["--stage3-checkpoint", "models:/gac-stage3@champion"], "--stage3-checkpoint needs --data-dir"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(project: Path, capsys, args: list[str], expected: str) -> None:
    assert expected in one_error_line(capsys, "evaluate", *args)
    assert not (project / "artifacts").exists()
    assert not (project / "metrics").exists()
    assert not (project.parent / "small" / "out").exists()
