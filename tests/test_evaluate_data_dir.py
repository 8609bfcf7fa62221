"""``gac evaluate --data-dir ROOT``: the trained pipeline scored on another BigEarthNet v2 root, beside the DVC outputs.

A small real DVC pipeline is run first, through the ``gac`` commands the stages call with the arguments their DVC
entry points pass (catalog → Stage 1 → Stage 2 trained and registered ``@challenger`` → Stage 3 trained, each writing
its tracked ``metrics/<stage>.json``), on synthetic tiles as ``data/``. Then the command scores that pipeline on
*another* root (other seed, hence other tiles, countries and seasons) with Stage 2 from the registry and Stage 3 from
the pipeline's model folder; ``gac catalog`` and ``gac infer`` run on that root too, and none of them may change a file
of the project outside its own output folder (and the files it keeps beside it; where every command's metrics go
without ``--metrics`` is checked for each command in ``tests/test_dvc_deps.py``).

The other root is what a user scoring a new region meets: 6 test tiles in the exact BigEarthNet v2 layout, two of
whose names carry a time stamp with 5 digits (``…_20170613T93020_…``: valid pairs, kept with season ``unknown``) and
two of which lack a band file (unusable: rejected, and counted in every summary).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gac.cli import main
from gac.evaluation.ablation import DETAILS, ROWS, headline
from gac.io.lock import lock_path
from gac.io.store import ShardStore

#: The other root: seed 11's 9 tiles; its 3 train tiles are left out of the metadata and its 3 validation tiles moved
#: to test, so the root holds 6 test tiles: Portugal, Lithuania and Serbia (summer, summer, winter) and three from
#: Austria and Ireland. Two get a 5-digit time stamp (kept, season unknown), two lose a band file (rejected).
OTHER_SEED, OTHER_TILES = 11, 9
ODD_STAMP = "T93020"
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


def gac(*args: str) -> int:
    return main(["--params", "params.yaml", *args])


def pipeline(stage: str, *args: str) -> int:
    """``gac <stage>`` as its DVC entry point (``pipelines/<stage>.py``) runs it: writing the tracked metrics file."""
    return gac(stage, "--metrics", f"metrics/{stage}.json", *args)


def run_printing(*args: str) -> str:
    """``gac …`` in this process; what it printed (exit status 0 asserted)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gac(*args)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def new_region(root: Path) -> dict[str, list[str]]:
    """The other root (see :data:`OTHER_SEED`): 6 test tiles, 2 with a 5-digit time stamp, 2 without a band file."""
    import pyarrow.parquet as pq

    from gac.data import layout, synthetic

    synthetic.generate(root, OTHER_TILES, seed=OTHER_SEED)
    path = root / layout.METADATA_FILE
    rows = [dict(r, labels=list(r["labels"]), split="test") for r in pd.read_parquet(path).to_dict("records")
            if r["split"] != "train"]  # fmt: skip
    layout.write_metadata(path, rows, pq.read_schema(path).metadata)  # the schema's "written by gac synth" kept
    ids = [r["patch_id"] for r in rows]  # Austria, Portugal, Austria, Lithuania, Ireland, Serbia
    odd = [synthetic.restamp(root, ids[i], ids[i].split("_")[2][:8] + ODD_STAMP) for i in (0, 3)]
    layout.s2_band_path(root, ids[2], "B05").unlink()
    s1_name = rows[4]["s1_name"]
    layout.s1_band_path(root, s1_name, "VH").unlink()
    return {"odd": odd, "broken": [ids[2], ids[4]], "kept": [odd[0], ids[1], odd[1], ids[5]]}


def owned(path: str, outputs: list[Path], workdir: Path) -> bool:
    """Whether ``path`` (relative to ``workdir``) is inside one of ``outputs`` or a file a command keeps beside it
    (``<out>.metrics.json``, ``.<out>.lock``, ``.<out>.stat-cache.json``)."""
    full = workdir / path
    return any(out in full.parents or full.name.startswith((f"{out.name}.", f".{out.name}.")) and
               full.parent == out.parent for out in outputs)  # fmt: skip


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
    tiles = new_region(other)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setenv("GAC_PROGRESS", "0")
        assert pipeline("catalog") == 0
        assert pipeline("stage1") == 0
        assert pipeline("stage2", *TRAIN) == 0  # registered as gac-stage2 @challenger, writes opt_v2
        assert pipeline("stage3", *TRAIN, "--no-register", "--no-cache") == 0
        external = workdir / "artifacts" / "evaluate-external" / "elsewhere"  # the default output folder
        outputs = {name: workdir / "runs" / name for name in ("catalog", "infer")}
        before = snapshot(workdir, external)
        printed = {
            "evaluate": run_printing("evaluate", "--data-dir", str(other),
                                     "--stage2-checkpoint", "models:/gac-stage2@challenger"),
            "catalog": run_printing("catalog", "--data-dir", str(other), "--output-dir", "runs/catalog"),
        }  # fmt: skip
        infer = ("infer", "--data-dir", str(other), "--output-dir", "runs/infer", "--stage2-checkpoint",
                 "artifacts/stage2/model", "--stage3-checkpoint", "artifacts/stage3/model")  # fmt: skip
        printed["infer --no-geotiff"] = run_printing(*infer, "--no-geotiff", "--save-visualizations", "1")
        opted_out = (workdir / "runs" / "infer" / "geotiff").exists()
        printed["infer"] = run_printing(*infer)  # the caches are complete: only the GeoTIFFs are new
        after = snapshot(workdir, external)
    return {"workdir": workdir, "store": store, "other": other, "out": external, "before": before, "after": after,
            "tiles": tiles, "printed": printed, "outputs": outputs, "opted_out": opted_out}  # fmt: skip


def test_metrics_have_every_row_and_both_kinds_of_group(world) -> None:
    saved = json.loads((world["out"] / "evaluate" / DETAILS).read_text())
    assert json.loads((world["out"] / "evaluate.json").read_text()) == headline(saved)  # the headline, beside
    assert {"stage1", "stage1+2", "full", "baseline", "truth"} <= set(ROWS)
    for row in ROWS:
        assert saved[row]["tiles"] == 4, row
    for row in ("stage1", "stage1+2", "full", "baseline"):
        assert saved[row]["psnr"] is not None and saved[row]["sar_edge"] is not None, row
    # every group of the scored tiles, each with its tiles in every row: read from the root's metadata and names
    from gac.data.metadata import acquisition, read_metadata

    meta = read_metadata(world["other"]).set_index("patch_id").loc[world["tiles"]["kept"]]
    expected = {"country": meta["country"].value_counts().to_dict(),
                "season": pd.Series([acquisition(pid)[1] if pid not in world["tiles"]["odd"] else "unknown"
                                     for pid in meta.index]).value_counts().to_dict()}  # fmt: skip
    for group, counts in expected.items():
        tables = saved["groups"][group]
        assert {value: {row: r["tiles"] for row, r in t.items()} for value, t in tables.items()} == {
            value: dict.fromkeys(ROWS, n) for value, n in counts.items()
        }, group
    assert expected["season"]["unknown"] == 2  # the two names with a 5-digit time stamp: scored, not lost
    prov = saved["provenance"]
    assert prov["split"] == "test" and prov["tiles_evaluated"] == 4 and prov["data_source"] == "synthetic"
    assert (prov["tiles_in_split"], prov["tiles_rejected"]) == (4, 2)
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
    # nothing outside the output folders was created or touched, but for the files each keeps beside its folder
    workdir, outputs = world["workdir"], [world["out"], *world["outputs"].values()]
    lock = str(lock_path(world["out"]).relative_to(workdir))
    assert lock in world["after"]
    assert world["before"] == {k: v for k, v in world["after"].items() if not owned(k, outputs, workdir)}
    assert {f"metrics/{s}.json" for s in ("catalog", "stage1", "stage2", "stage3")} <= set(world["before"])
    assert (workdir / "artifacts" / "stage2" / "model").is_dir()  # the pipeline did run
    assert not (workdir / "artifacts" / "evaluate").exists()
    assert not (workdir / "metrics" / "evaluate.json").exists()
    # a metrics file belongs to the run that made it: beside its output folder
    assert json.loads((workdir / "runs" / "catalog.metrics.json").read_text())["tiles"] == 4


def test_registered_versions_get_no_eval_tags_but_the_run_names_the_root(world) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{world['store'] / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias("gac-stage2", "challenger")
    assert not [k for k in version.tags if k.startswith("eval.")]  # gac promote compares only the pipeline's own
    saved = json.loads((world["out"] / "evaluate" / DETAILS).read_text())
    run = client.get_run(saved["provenance"]["mlflow_run_id"])
    assert run.data.tags["gac.data_root"] == str(world["other"].resolve())
    # told apart from the project's own evaluation and from other roots: by name, and by the catalog's content
    assert run.info.run_name.startswith("evaluate · elsewhere (test) · workspace @ "), run.info.run_name
    digest = ShardStore(world["out"] / "caches" / "catalog").content_digest()
    assert run.data.tags["gac.catalog_sha256"] == digest == saved["provenance"]["catalog_sha256"]


def prints_every_rejection_and_one_note(world, command: str) -> None:
    """``command`` printed one ``rejected`` line per unusable tile, one note about the names without a readable date,
    and the catalog's summary."""
    lines = world["printed"][command].splitlines()
    rejected = [line.split(":")[0].removeprefix("rejected ") for line in lines if line.startswith("rejected ")]
    assert rejected == world["tiles"]["broken"], lines
    odd = "note: 2 tile(s) kept with season 'unknown': their patch_id has no readable acquisition date (e.g. "
    assert len([line for line in lines if line.startswith(odd)]) == 1, lines
    assert "Catalog: 4 tiles, 2 rejected" in world["printed"][command]


def test_gac_catalog_on_the_new_region_keeps_the_odd_names_with_season_unknown(world) -> None:
    prints_every_rejection_and_one_note(world, "catalog")
    index = ShardStore(world["workdir"] / "runs" / "catalog").index.set_index("patch_id")
    assert list(index.loc[world["tiles"]["odd"], "season"]) == ["unknown", "unknown"]


def test_evaluate_data_dir_prints_the_rejections_and_counts_them(world) -> None:
    prints_every_rejection_and_one_note(world, "evaluate")
    catalog = world["out"] / "caches" / "catalog"
    assert sorted(pd.read_parquet(catalog / "rejected.parquet")["patch_id"]) == sorted(world["tiles"]["broken"])
    where = (catalog / "rejected.parquet").relative_to(world["workdir"])
    evaluated = f"Evaluated 4 of 6 'test' tiles (2 rejected: see {where}; missing from caches: none"
    assert evaluated in world["printed"]["evaluate"]


def test_infer_prints_the_rejections_and_counts_them(world) -> None:
    prints_every_rejection_and_one_note(world, "infer --no-geotiff")
    catalog = world["workdir"] / "runs" / "infer" / "catalog"
    assert sorted(pd.read_parquet(catalog / "rejected.parquet")["patch_id"]) == sorted(world["tiles"]["broken"])
    line = "Processed 4 of 6 tiles (2 rejected: see runs/infer/catalog/rejected.parquet), Errors 0, Output dir runs/"
    line += "infer"
    for run in ("infer --no-geotiff", "infer"):  # the second run resumed every cache: its count is still the root's
        assert f"{line}\n" in world["printed"][run], run


def test_infer_writes_a_geotiff_of_every_tile_where_its_input_tile_lies(world) -> None:
    import rasterio

    from gac.data import layout

    assert not world["opted_out"]  # --no-geotiff
    out = world["workdir"] / "runs" / "infer"
    tifs = {p.name.removesuffix("_opt_v3.tif"): p for p in (out / "geotiff").glob("*_opt_v3.tif")}
    assert sorted(tifs) == sorted(world["tiles"]["kept"])  # every opt_v3 tile, by default
    for patch_id, path in tifs.items():
        with rasterio.open(path) as tif, rasterio.open(layout.s2_band_path(world["other"], patch_id, "B02")) as src:
            assert tif.count == 12 and tif.crs == src.crs and tif.transform == src.transform, patch_id
    assert len(list((out / "figures").glob("*_compare.png"))) == 1  # --save-visualizations 1: PNGs, as in the seed


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
