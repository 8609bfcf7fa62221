"""Evaluation end to end on real stores: synthetic tiles → catalog → opt caches of known quality → ablation.

The caches are the true S2 tile plus Gaussian noise of known size (Stage 1 noisiest, the full pipeline least), so the
ablation's ordering is known by construction. opt_v3 carries the noise's true σ (a calibrated model) and opt_v2 half
of it (an overconfident one), so their calibration figures are known too. One test tile is missing from opt_v3 (a
rejected tile) and the caches of Stage 2 and 3 name registered model versions in a real MLflow registry (SQLite in
tmp_path). Each cache records another weights origin (:data:`ORIGINS`).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gac.config import (
    CatalogParams,
    DataParams,
    EvaluateParams,
    MlflowParams,
    Params,
    Stage1Params,
    Stage2Params,
    Stage3Params,
    TargetParams,
)
from gac.errors import GacError
from gac.evaluation.ablation import (
    DETAILS,
    HEADLINE,
    HEADLINE_SIGMA,
    METRICS,
    ROWS,
    cache_roots,
    headline,
    metric_key,
)
from gac.io.store import ShardStore
from gac.stages.evaluate import run as evaluate

#: float comparisons of kernel output: `make test` runs them again with oneDNN and MKL held to AVX2
pytestmark = pytest.mark.numerics

NOISE_DN = {"stage1": 1500.0, "stage2": 600.0, "stage3": 150.0}
#: The σ each cache claims (key ``sigma``): the truth for opt_v3, half of it for opt_v2, none for opt_v1.
CLAIMED_DN = {"stage2": 300.0, "stage3": 150.0}
#: Each cache's weights origin, one of each kind gac.io.tracking.weights_origin records.
ORIGINS = {"stage1": "random init", "stage2": "local checkpoint: /w/Prithvi_EO_V2_tiny_TL.pt",
           "stage3": "hub (pretrained)"}  # fmt: skip
N_VISUALIZE = 1


def write_cache(catalog: ShardStore, root, stage: str, sigma: float, drop: str | None, provenance: dict) -> None:
    """An opt cache = truth + N(0, sigma) DN, without the tile ``drop`` (recorded as rejected), with the σ of
    :data:`CLAIMED_DN` as its ``sigma`` array where it has one."""
    index = catalog.index
    kept = index[index["patch_id"] != drop]
    rng = np.random.default_rng(len(stage))
    truth = catalog.read("s2", kept).astype(np.float64)
    opt = np.clip(np.rint(truth + rng.normal(0.0, sigma, truth.shape)), 0, 65535).astype(np.uint16)
    rejected = pd.DataFrame({"patch_id": [drop], "reason": ["non-finite generated output"]}) if drop else None
    store = ShardStore(root)
    arrays = {"opt": opt}
    if stage in CLAIMED_DN:
        arrays["sigma"] = np.full_like(opt, CLAIMED_DN[stage])
    store.write_shard("00000", kept.drop(columns=["shard", "row"]), arrays, rejected)
    store.finalize()
    (store.root / "provenance.json").write_text(json.dumps({"stage": stage, **provenance}))


@pytest.fixture(scope="module")
def world(tmp_path_factory, empty_mlflow_db):
    """Catalog, three caches, registry versions, params; and one evaluation run over the test split."""
    from mlflow import MlflowClient

    from gac.data import catalog as catalog_mod
    from gac.data import synthetic

    tmp = tmp_path_factory.mktemp("evaluate")
    synthetic.generate(tmp / "data", 12, seed=5)
    catalog_mod.build(CatalogParams(out=str(tmp / "catalog"), workers=0), tmp / "data", progress=False)
    catalog = ShardStore(tmp / "catalog")
    shutil.copy(empty_mlflow_db, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (tmp / "model").mkdir()
    versions = {}
    for stage in ("stage2", "stage3"):
        name = f"gac-{stage}"
        client.create_registered_model(name)
        versions[stage] = str(client.create_model_version(name, source=str(tmp / "model")).version)
        client.update_model_version(name, versions[stage], description=f"# {name}\n\n## Data\n- source: synthetic\n")
    cfg = Params(
        data=DataParams(root=str(tmp / "data"), source="synthetic", exclude=[]),  # every tile: counts known
        mlflow=MlflowParams(tracking_uri=uri, artifact_location=str(tmp / "artifacts"), experiment="gac-test"),
        catalog=CatalogParams(out=str(tmp / "catalog")),
        stage1=Stage1Params(out=str(tmp / "stage1")),
        stage2=Stage2Params(out=str(tmp / "stage2")),
        stage3=Stage3Params(out=str(tmp / "stage3")),
        evaluate=EvaluateParams(n_visualize=N_VISUALIZE, batch_size=3, out=str(tmp / "out")),
    )
    test_ids = sorted(catalog.index.loc[catalog.index["split"] == "test", "patch_id"])
    dropped = test_ids[-1]
    for stage, sigma in NOISE_DN.items():
        reg = {"registered_model": f"gac-{stage}", "version": versions[stage],
               "model_uri": f"models:/gac-{stage}/{versions[stage]}"} if stage in versions else {}  # fmt: skip
        write_cache(catalog, cache_roots(cfg)[stage], stage, sigma, dropped if stage == "stage3" else None,
                    {"weights_origin": ORIGINS[stage], "seconds_per_tile": 0.5, **reg})  # fmt: skip
    calls = []

    def attention(s1_db: np.ndarray, opt_v2: np.ndarray) -> np.ndarray:
        calls.append((s1_db.shape, opt_v2.shape))
        return np.abs(s1_db[:, 0, ::8, ::8])  # any (B, h, w) map

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = evaluate(cfg, cfg.evaluate.out, metrics_path=tmp / "metrics" / "evaluate.json",
                          attention_maps=attention)  # fmt: skip
    # what this evaluation wrote into the registry, read now: later tests evaluate again and re-tag these versions
    tagged = {stage: client.get_model_version(f"gac-{stage}", version) for stage, version in versions.items()}
    return {"tmp": tmp, "cfg": cfg, "catalog": catalog, "client": client, "versions": versions, "result": result,
            "stdout": stdout.getvalue(), "test_ids": test_ids, "dropped": dropped, "tagged": tagged,
            "attention_calls": calls}  # fmt: skip


def test_details_json_has_every_row_metric_and_group(world):
    saved = json.loads((world["tmp"] / "out" / DETAILS).read_text())
    assert saved == world["result"]
    evaluated = len(world["test_ids"]) - 1
    for row in ROWS:
        assert set(METRICS) | {"tiles", "seconds_per_tile"} <= set(saved[row]), row
        assert saved[row]["tiles"] == evaluated
        assert all(np.isfinite(saved[row][m]) for m in METRICS)
    assert saved["stage1"]["seconds_per_tile"] == 0.5 and saved["baseline"]["seconds_per_tile"] > 0
    for group in ("country", "season"):
        tables = saved["groups"][group]
        assert tables and sum(t["full"]["tiles"] for t in tables.values()) == evaluated
    prov = saved["provenance"]
    assert prov["split"] == "test" and prov["data_source"] == "synthetic"
    assert prov["tiles_in_split"] == len(world["test_ids"]) and prov["tiles_evaluated"] == evaluated
    assert prov["missing"] == {"opt_v1": 0, "opt_v2": 0, "opt_v3": 1}
    assert prov["stages"]["stage2"]["weights_origin"] == ORIGINS["stage2"]
    assert "ridge regression" in prov["stages"]["baseline"]["weights_origin"]


def test_metrics_json_holds_the_headline_only(world):
    """``dvc metrics show`` prints a column per key of every metrics file: the JSON it reads stays short."""
    saved = json.loads((world["tmp"] / "metrics" / "evaluate.json").read_text())
    r = world["result"]
    assert saved == headline(r)
    assert saved["full"] == {m: r["full"][m] for m in (*HEADLINE["full"], *HEADLINE_SIGMA)}  # opt_v3 has σ
    assert saved["truth"] == {"sar_edge": 0.0, "block_periodicity": r["truth"]["block_periodicity"]}
    assert saved["truth"]["sar_edge"] <= TargetParams().sar_edge  # the target is reachable: the truth meets it
    assert saved["tiles"] == r["provenance"]["tiles_evaluated"] == len(world["test_ids"]) - 1
    assert saved["leakage_gap_db"] == r["leakage"]["gap_db"]
    flat = [f"{k}.{m}" for k, v in saved.items() for m in (v if isinstance(v, dict) else [""])]
    assert len(flat) <= 18 and not {"groups", "provenance", "stage1", "baseline"} & set(saved), flat


def test_rows_with_sigma_are_scored_for_calibration(world):
    """opt_v3 claims the noise's true σ: its 95 % interval covers 95 % and its UCE is near 0; opt_v2 claims half its
    σ: its "95 %" interval covers what |z| ≤ 0.98 covers, 67 %. Pixels clipped at 0 DN (dark bands) only have smaller
    errors, so each coverage lies between its Gaussian value and that plus the share of clipped pixels, up to the
    binomial error. Rows without σ have no such figures; σ constant over a tile ranks nothing (Spearman 0)."""
    import math

    from gac.evaluation.uncertainty import FIGURES

    r, cfg = world["result"], world["cfg"]
    scored = [p for p in world["test_ids"] if p != world["dropped"]]
    pixels = len(scored) * 12 * 120 * 120
    for stage, row in (("stage3", "full"), ("stage2", "stage1+2")):
        store = ShardStore(cache_roots(cfg)[stage])
        clipped = float((store.read("opt", store.rows_for(scored)) == 0).mean())
        gaussian = math.erf(1.959963984540054 * CLAIMED_DN[stage] / NOISE_DN[stage] / math.sqrt(2))
        binomial = 5 * math.sqrt(gaussian * (1 - gaussian) / pixels)
        assert gaussian - binomial <= r[row]["coverage95"] <= gaussian + clipped + binomial, (row, clipped)
        assert r[row]["sharpness"] == pytest.approx(CLAIMED_DN[stage] / 1e4)
        assert r[row]["spearman_pixel"] == 0.0  # σ constant over each tile ranks nothing
    # UCE: opt_v2's variances are a quarter of its errors' (|MSE − MV| ≈ 0.75·MSE); opt_v3's match but for the
    # clipped pixels, a few % of its variance
    assert r["full"]["uce"] < 0.1 * (CLAIMED_DN["stage3"] / 1e4) ** 2
    assert r["stage1+2"]["uce"] > 0.5 * (NOISE_DN["stage2"] / 1e4) ** 2 > 50 * r["full"]["uce"]
    assert all(m not in r[row] for row in ("stage1", "baseline", "truth") for m in FIGURES)
    run = world["client"].get_run(r["provenance"]["mlflow_run_id"])
    assert run.data.metrics[metric_key("full", "coverage95")] == pytest.approx(r["full"]["coverage95"])


def test_truth_row_is_perfect_and_meets_every_target(world):
    truth, targets = world["result"]["truth"], TargetParams()
    assert truth["psnr"] == 100.0 and truth["ssim"] == pytest.approx(1.0) and truth["sar_edge"] == 0.0
    assert truth["psnr"] >= targets.psnr and truth["ssim"] >= targets.ssim
    assert truth["sam_deg"] <= targets.sam_deg and truth["sar_edge"] <= targets.sar_edge
    assert truth["block_periodicity"] < 0  # a real image decorrelates with distance: the reference value
    # what the noisy stages add is white noise: no token blocks
    assert all(abs(world["result"][row]["block_periodicity"]) < 0.05 for row in ("stage1+2", "full"))


def test_ablation_ordering_known_by_construction(world):
    r = world["result"]
    assert r["full"]["psnr"] > r["stage1+2"]["psnr"] > r["stage1"]["psnr"]
    assert r["full"]["rmse"] < r["stage1+2"]["rmse"] < r["stage1"]["rmse"]
    assert r["full"]["ssim"] > r["stage1+2"]["ssim"] > r["stage1"]["ssim"]
    # noise of 150 DN is 0.015 reflectance: PSNR ≈ 20·log10(1/0.015) ≈ 36.5 dB (a little more from clipping at 0)
    assert 35.0 < r["full"]["psnr"] < 40.0


def test_printed_table_and_csvs(world):
    out = world["tmp"] / "out"
    text = world["stdout"]
    assert f"Evaluated {len(world['test_ids']) - 1} of {len(world['test_ids'])} 'test' tiles" in text
    header = next(line for line in text.splitlines() if line.startswith("row"))
    from gac.evaluation.uncertainty import FIGURES

    assert header.split() == ["row", "tiles", *METRICS, *FIGURES, "seconds_per_tile"]
    assert [line.split()[0] for line in text.splitlines() if line.split() and line.split()[0] in ROWS] == list(ROWS)
    ablation = pd.read_csv(out / "plots" / "ablation.csv")
    assert list(ablation["row"]) == list(ROWS)
    assert np.allclose(ablation.set_index("row")["psnr"]["full"], world["result"]["full"]["psnr"])
    per_tile = pd.read_csv(out / "plots" / "per_tile.csv")
    assert len(per_tile) == len(ROWS) * (len(world["test_ids"]) - 1)
    assert world["dropped"] not in set(per_tile["patch_id"])


def test_figures_are_real_pictures(world):
    import matplotlib.image as mpimg

    shown = world["test_ids"][:N_VISUALIZE]  # sorted by patch id; the dropped tile is the last one
    figures = world["tmp"] / "out" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == sorted(
        f"{pid}_{kind}.png" for pid in shown for kind in ("compare", "grounding", "attention")
    )
    for path in figures.iterdir():
        image = mpimg.imread(path)
        assert path.stat().st_size > 10_000 and image.shape[0] > 200 and image[..., :3].std() > 0.05, path.name
    assert world["attention_calls"] == [((N_VISUALIZE, 2, 120, 120), (N_VISUALIZE, 12, 120, 120))]
    origin = ("split test · weights: opt_v1 random init; opt_v2 released file Prithvi_EO_V2_tiny_TL.pt; opt_v3 the "
              "hub (pretrained) — random-init weights (demo: not a trained model)")  # fmt: skip
    for path in figures.iterdir():  # every title names the weights' origin and the split (kept in the PNG)
        with Image.open(path) as img:
            assert img.text["Title"].split("\n")[1] == origin, path.name


def test_geotiff_has_tile_georeference(world):
    import rasterio
    from affine import Affine

    pid = world["test_ids"][0]
    row = world["catalog"].rows_for([pid]).iloc[0]
    with rasterio.open(world["tmp"] / "out" / "geotiff" / f"{pid}_opt_v3.tif") as src:
        assert src.crs == rasterio.crs.CRS.from_user_input(row["crs"])
        assert src.transform == Affine(*list(row["transform"])[:6])
        assert src.count == 24 and src.dtypes[0] == "uint16"  # opt_v3 has sigma: 12 mean and 12 σ bands
        assert src.descriptions[11:13] == ("B12", "B01_sigma")
        cache = ShardStore(cache_roots(world["cfg"])["stage3"])
        np.testing.assert_array_equal(src.read(), np.concatenate([cache.read(k, cache.rows_for([pid]))[0]
                                                                  for k in ("opt", "sigma")]))  # fmt: skip


def test_mlflow_run_and_model_version_tags(world):
    client, r = world["client"], world["result"]
    experiment = client.get_experiment_by_name("gac-test")
    runs = client.search_runs([experiment.experiment_id], "tags.`gac.stage` = 'evaluate'")
    (run,) = [run for run in runs if run.info.run_id == r["provenance"]["mlflow_run_id"]]
    assert run.info.run_name.startswith("evaluate · workspace @ ")  # stage, DVC experiment, git revision
    assert run.data.metrics[metric_key("stage1+2", "psnr")] == pytest.approx(r["stage1+2"]["psnr"])
    assert run.data.tags["gac.split"] == "test"
    # the UI's "Datasets": the catalog and the three caches scored, each with its store's content digest
    from gac.evaluation.ablation import LABELS

    datasets = {i.dataset.name: i.dataset.digest for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    roots = {"catalog": world["cfg"].catalog.out} | {LABELS[s]: p for s, p in cache_roots(world["cfg"]).items()}
    assert datasets == {name: ShardStore(root).content_digest()[:16] for name, root in roots.items()}
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/plots", "evaluate/figures", "evaluate/geotiff"} <= logged
    for stage, row in (("stage2", "stage1+2"), ("stage3", "full")):
        mv = world["tagged"][stage]
        assert float(mv.tags["eval.psnr"]) == pytest.approx(r[row]["psnr"])
        assert float(mv.tags["eval.sar_edge"]) == pytest.approx(r[row]["sar_edge"])
        assert mv.tags["eval.split"] == "test" and mv.tags["eval.data_source"] == "synthetic"
        assert mv.description.startswith(f"# gac-{stage}") and "## Evaluation" in mv.description


def test_missing_cache_is_one_line_error(world, tmp_path):
    cfg = world["cfg"].model_copy(update={"stage3": Stage3Params(out=str(tmp_path / "nope"))})
    with pytest.raises(GacError, match="not a GAC store"):
        evaluate(cfg, tmp_path / "out", metrics_path=tmp_path / "m.json", verbose=False)


def test_baseline_beats_constant_mean_on_train(world):
    from gac.evaluation.baseline import Baseline, fit_baseline

    catalog = world["catalog"]
    model = fit_baseline(catalog, "train")
    train = catalog.index[catalog.index["split"] == "train"]
    s1, s2 = catalog.read("s1", train), catalog.read("s2", train).astype(np.float64)
    pred = model.predict(s1)
    assert pred.dtype == np.uint16 and pred.shape == s2.shape
    mse_model = np.mean((pred - s2) ** 2)
    mse_const = np.mean((s2.mean(axis=(0, 2, 3), keepdims=True) - s2) ** 2)
    assert mse_model < 0.85 * mse_const, (mse_model, mse_const)
    again = Baseline.from_state(dict(np.load(world["tmp"] / "out" / "baseline.npz")))
    np.testing.assert_array_equal(again.predict(s1), pred)
    with pytest.raises(GacError, match="no 'nowhere' tiles"):
        fit_baseline(catalog, "nowhere")


def test_cli_overrides_split_and_paths(world, tmp_path):
    import yaml

    from gac.cli import main

    shutil.copy(world["tmp"] / "mlflow.db", tmp_path / "mlflow.db")  # the registry as it is, without touching it
    cfg = world["cfg"].model_dump(mode="json")
    cfg["evaluate"]["n_visualize"] = 0
    cfg["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg))
    metrics = tmp_path / "val.json"
    code = main(["--params", str(tmp_path / "params.yaml"), "evaluate", "--split", "validation",
                 "--output-dir", str(tmp_path / "val"), "--metrics", str(metrics)])  # fmt: skip
    assert code == 0
    saved = json.loads((tmp_path / "val" / DETAILS).read_text())
    n_val = int((world["catalog"].index["split"] == "validation").sum())
    assert saved["provenance"]["split"] == "validation" and saved["full"]["tiles"] == n_val
    assert json.loads(metrics.read_text()) == headline(saved)
    assert (tmp_path / "val" / "plots" / "ablation.csv").is_file()
    assert not (tmp_path / "val" / "figures").exists()


def test_flagged_targets_are_excluded_and_counted(world, tmp_path):
    """Evaluates again into the shared store (the tests above read the first evaluation's tags from ``world``)."""
    catalog, cfg = world["catalog"], world["cfg"]
    test = catalog.index[catalog.index["split"] == "test"]
    cloudy = set(test.loc[test["contains_cloud_or_shadow"], "patch_id"])
    snowy = set(test.loc[test["contains_seasonal_snow"], "patch_id"])
    assert cloudy or snowy, "the synthetic set should contain flagged test tiles"
    filtered = cfg.model_copy(update={"data": cfg.data.model_copy(update={"exclude": ["cloud_or_shadow",
                                                                                     "seasonal_snow"]})})  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = evaluate(filtered, tmp_path / "out", metrics_path=tmp_path / "evaluate.json", verbose=True)
    assert result["provenance"]["excluded"] == {"cloud_or_shadow": len(cloudy), "seasonal_snow": len(snowy)}
    kept = set(test["patch_id"]) - cloudy - snowy - {world["dropped"]}
    assert result["full"]["tiles"] == len(kept)
    assert f"cloud_or_shadow {len(cloudy)}, seasonal_snow {len(snowy)}" in stdout.getvalue()
    per_tile = pd.read_csv(tmp_path / "out" / "plots" / "per_tile.csv")
    assert set(per_tile["patch_id"]) == kept
