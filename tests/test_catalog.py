"""The catalog stage: every sample tile packed, paired through the metadata, equal to torchgeo's reader, bad tiles
rejected with one line each, resumable and never half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from gac import cli
from gac.config import CatalogParams
from gac.data import catalog, layout, metadata
from gac.data.synthetic import broken_patches, generate, geotiff_bytes
from gac.errors import GacError
from gac.io.store import SHARDS, ShardStore

REPO = Path(__file__).resolve().parents[1]
#: Which band file each synthetic breakage damages, so the rejection reason must name it.
BROKEN_FILE = {"missing_band": "_B05.tif", "corrupt_tiff": "_B04.tif", "wrong_shape": "_B03.tif", "nan_sar": "_VV.tif"}


def _gac(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run the real ``gac`` command (``python -m gac``) in a fresh interpreter and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "gac", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _gac_here(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    """Run ``gac`` through :func:`gac.cli.main` in this process (what ``python -m gac`` calls; no start-up cost)."""
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _build(root: Path, out: Path, **params) -> tuple[catalog.CatalogReport, ShardStore]:
    """Build a catalog in one process (the test machine is shared) and open it."""
    report = catalog.build(CatalogParams(out=str(out), workers=1, **params), root, progress=False)
    return report, ShardStore(out)


def _mtimes(out: Path) -> dict[str, int]:
    """Modification time of every file of every shard, by path relative to the store."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / SHARDS).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sample_catalog(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[catalog.CatalogReport, Path]:
    """The real sample's catalog, in shards of 8 so that reading crosses shard boundaries."""
    out = tmp_path_factory.mktemp("sample-catalog") / "catalog"
    report, _ = _build(sample_root, out, shard_size=8)
    return report, out


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight synthetic tiles, one of each broken kind among them."""
    root = tmp_path_factory.mktemp("broken") / "root"
    generate(root, n_tiles=8, seed=3, broken=dict.fromkeys(BROKEN_FILE, 1))
    return root


# -- the real sample -------------------------------------------------------------------------------------------------
def test_sample_catalog_has_every_tile_with_its_georeference(sample_root, sample_catalog):
    report, out = sample_catalog
    meta = metadata.read_metadata(sample_root)
    store = ShardStore(out)
    index = store.index

    assert report.tiles == len(meta) == len(index) and report.rejected.empty
    assert set(index["patch_id"]) == set(meta["patch_id"])
    s2, s1 = store.read("s2"), store.read("s1")
    assert (s2.shape, s2.dtype) == ((len(meta), 12, 120, 120), np.uint16)
    assert (s1.shape, s1.dtype) == ((len(meta), 2, 120, 120), np.float32)
    assert np.isfinite(s1).all() and s2.any(axis=(2, 3)).all()

    assert {"crs", "transform", "split", "country", "season"} <= set(index.columns)
    by_id = meta.set_index("patch_id")
    assert (index["split"].to_numpy() == by_id.loc[index["patch_id"], "split"].to_numpy()).all()
    assert (index["country"].to_numpy() == by_id.loc[index["patch_id"], "country"].to_numpy()).all()
    assert set(index["crs"]) == {"EPSG:32633"}  # tile T33UUP, UTM 33N
    assert set(index["season"]) == {"summer"}  # all acquired in June 2017
    for rec in index.itertuples():
        # The 10 m grid of the patch: 10 m pixels, north up, origin at the patch's upper-left corner.
        with rasterio.open(layout.s2_band_path(sample_root, rec.patch_id, "B02")) as src:
            assert tuple(rec.transform) == pytest.approx(tuple(src.transform)[:6])
        assert tuple(rec.transform)[:2] == (10.0, 0.0) and rec.transform[4] == -10.0


def test_pairing_comes_from_metadata(sample_root, sample_catalog):
    """S1 pixels are those of the metadata's ``s1_name``, not of a name derived from the patch id."""
    _, out = sample_catalog
    meta = metadata.read_metadata(sample_root).set_index("patch_id")
    store = ShardStore(out)
    index = store.index
    assert (index["s1_name"].to_numpy() == meta.loc[index["patch_id"], "s1_name"].to_numpy()).all()
    # The sample mixes S1 products (S1A and S1B passes): guessing one S1 product per S2 product would be wrong.
    products = {layout.s1_tile_dir(name) for name in meta["s1_name"]}
    assert len(products) > 1
    for rec in index.itertuples():
        s1 = store.array(rec.shard, "s1")[rec.row]
        for i, band in enumerate(layout.S1_BANDS):  # [VV, VH]; 120 px at 10 m, so no resampling: exact
            with rasterio.open(layout.s1_band_path(sample_root, meta.loc[rec.patch_id, "s1_name"], band)) as src:
                np.testing.assert_array_equal(s1[i], src.read(1))
        with rasterio.open(layout.s2_band_path(sample_root, rec.patch_id, "B04")) as src:
            b04 = store.array(rec.shard, "s2")[rec.row][layout.S2_BANDS.index("B04")]
            np.testing.assert_array_equal(b04, src.read(1))


@pytest.fixture(scope="module")
def torchgeo_root(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COPY of the sample with placeholder reference maps: torchgeo's ``__getitem__`` always loads one, and the
    sample has none (the wheel ships no CORINE maps). The maps only feed torchgeo's ``mask``, which is not compared."""
    root = tmp_path_factory.mktemp("torchgeo") / "sample"
    shutil.copytree(sample_root, root)
    for patch_id in metadata.read_metadata(root)["patch_id"]:
        path = layout.reference_map_path(root, patch_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(geotiff_bytes(np.full((120, 120), 311, np.uint16), 32633, 0.0, 0.0, {}))
    return root


def test_catalog_matches_torchgeo_bigearthnetv2(torchgeo_root, sample_catalog):
    from torchgeo.datasets import BigEarthNetV2

    _, out = sample_catalog
    store = ShardStore(out)
    index = store.index.set_index("patch_id")
    seen = 0
    for split in BigEarthNetV2.valid_splits:  # 'train', 'val', 'test' ('val' is our 'validation')
        ds = BigEarthNetV2(torchgeo_root, split=split, bands="all")
        for i in range(len(ds)):
            item = ds[i]
            rec = index.loc[ds.metadata_df.loc[i, "patch_id"]]
            assert rec["split"] == BigEarthNetV2.split_map[split]
            s2 = store.array(rec["shard"], "s2")[rec["row"]]
            s1 = store.array(rec["shard"], "s1")[rec["row"]]
            # S2: torchgeo sorts the band files B01..B08, B8A, B09, B11, B12 (our order) and resamples with the same
            # GDAL bilinear call; its int32 read of uint16 DN, as float32, is exact (DN < 2**24). So: equal.
            np.testing.assert_array_equal(item["image_s2"].numpy(), s2.astype(np.float32))
            # S1: torchgeo returns [VH, VV] (sorted file names) and reads the float32 dB with out_dtype='int32', which
            # GDAL converts by rounding half away from zero (measured: not truncation). So torchgeo == our dB, band
            # order reversed, rounded that way, and differs from it by at most 0.5 dB.
            ours = s1[::-1]
            rounded = np.sign(ours) * np.floor(np.abs(ours) + 0.5)
            np.testing.assert_array_equal(item["image_s1"].numpy(), rounded)
            assert np.abs(item["image_s1"].numpy() - ours).max() <= 0.5 + 1e-6
            seen += 1
    assert seen == len(index)


# -- selection -------------------------------------------------------------------------------------------------------
def test_select_keeps_metadata_order_within_splits():
    meta = pd.DataFrame({"patch_id": list("abcdef"), "split": ["train", "test", "validation", "test", "train", "test"]})
    assert list(metadata.select(meta, ["test"], None)["patch_id"]) == ["b", "d", "f"]
    assert list(metadata.select(meta, ["train", "test"], 3)["patch_id"]) == ["a", "b", "d"]
    assert metadata.select(meta, ["validation"], 5).index.tolist() == [0]


def test_cli_honours_max_tiles_and_splits(sample_root, tmp_path, capsys):
    metrics = tmp_path / "catalog.json"
    args = ["--data-dir", sample_root, "--output-dir", tmp_path / "cat", "--metrics", metrics, "--workers", "1"]
    code, stdout, stderr = _gac_here(
        capsys, "--params", REPO / "params.yaml", "catalog", *args, "--max-tiles", "4", "--splits", "validation"
    )
    assert code == 0, stderr
    meta = metadata.read_metadata(sample_root)
    expected = meta[meta["split"] == "validation"]["patch_id"].head(4).tolist()
    index = ShardStore(tmp_path / "cat").index
    assert index["patch_id"].tolist() == expected
    assert json.loads(metrics.read_text())["tiles"] == 4 and json.loads(metrics.read_text())["rejected"] == 0
    assert "Catalog: 4 tiles, 0 rejected" in stdout


# -- bad input -------------------------------------------------------------------------------------------------------
def test_broken_tiles_are_rejected_with_a_line_naming_the_file(broken_root, tmp_path):
    broken = broken_patches(broken_root)
    assert sorted(broken.values()) == sorted(BROKEN_FILE)
    report, store = _build(broken_root, tmp_path / "cat", shard_size=3)

    reasons = dict(zip(report.rejected["patch_id"], report.rejected["reason"], strict=True))
    assert reasons.keys() == broken.keys()
    for patch_id, kind in broken.items():
        reason = reasons[patch_id]
        assert "\n" not in reason
        bad_file = reason.split(": ", 1)[0]
        assert bad_file.endswith(BROKEN_FILE[kind]) and Path(bad_file).parent.name in (
            patch_id,
            metadata.read_metadata(broken_root).set_index("patch_id").loc[patch_id, "s1_name"],
        ), reason
    assert "NaN" in reasons[next(p for p, k in broken.items() if k == "nan_sar")]
    # The stage went on: every other tile is in the catalog, with its pixels.
    assert report.tiles == len(store.index) == 8 - len(broken)
    assert set(store.index["patch_id"]).isdisjoint(broken)
    assert store.read("s2").shape == (report.tiles, 12, 120, 120)


def test_cli_reports_rejected_tiles_and_goes_on(broken_root, tmp_path, capsys):
    metrics = tmp_path / "m.json"
    code, stdout, stderr = _gac_here(
        capsys, "--params", REPO / "params.yaml", "catalog",
        "--data-dir", broken_root, "--output-dir", tmp_path / "cat", "--metrics", metrics, "--workers", "1",
    )  # fmt: skip
    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if line.startswith("rejected ")]
    assert len(lines) == 4
    for patch_id, kind in broken_patches(broken_root).items():
        assert any(line.startswith(f"rejected {patch_id}: ") and BROKEN_FILE[kind] in line for line in lines)
    assert json.loads(metrics.read_text())["tiles"] == 4


def test_read_tile_rejects_all_nodata_band(synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    meta = metadata.read_metadata(root)
    patch_id, s1_name = meta.loc[0, "patch_id"], meta.loc[0, "s1_name"]
    path = layout.s2_band_path(root, patch_id, "B08")
    with rasterio.open(path) as src:
        epsg, (x, y) = src.crs.to_epsg(), (src.transform.c, src.transform.f)
    path.write_bytes(geotiff_bytes(np.zeros((120, 120), np.uint16), epsg, x, y, {}))
    with pytest.raises(catalog.TileError, match=r"_B08\.tif: all pixels are nodata"):
        catalog.read_tile(root, patch_id, s1_name)


def test_missing_metadata_is_one_clear_error(tmp_path):
    with pytest.raises(GacError, match=r"metadata\.parquet: not found") as err:
        catalog.build(CatalogParams(out=str(tmp_path / "cat")), tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cat").exists()


def test_output_dir_that_is_not_a_catalog_is_never_deleted(synthetic_root, tmp_path):
    """A rebuild deletes a stale catalog, but an ``--output-dir`` mistyped onto other data must survive."""
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(GacError, match=r"precious: exists and is not a catalog \(no catalog\.json\)"):
        _build(synthetic_root, out, max_tiles=1)
    assert (out / "thesis.tex").read_text() == "years of work"
    before = {p: p.stat().st_mtime_ns for p in synthetic_root.rglob("*")}
    with pytest.raises(GacError, match=r"exists and is not a catalog"):
        _build(synthetic_root, synthetic_root, max_tiles=1)  # --output-dir = --data-dir
    assert {p: p.stat().st_mtime_ns for p in synthetic_root.rglob("*")} == before  # the shared root: nothing written


def test_metadata_without_a_column_is_one_clear_error(synthetic_root, tmp_path):
    metadata.read_metadata(synthetic_root).drop(columns="s1_name").to_parquet(tmp_path / layout.METADATA_FILE)
    with pytest.raises(GacError, match=r"metadata\.parquet: missing column\(s\) \['s1_name'\]"):
        metadata.read_metadata(tmp_path)


def test_bad_params_key_exits_2_with_one_line(tmp_path):
    """Through a fresh ``python -m gac``: exit status 2, no traceback, one ``gac: error:`` line naming the key."""
    (tmp_path / "bad.yaml").write_text("catalog:\n  shard_sise: 8\n")
    done = _gac("--params", tmp_path / "bad.yaml", "catalog", "--data-dir", tmp_path, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("gac: error: ") and "bad.yaml" in line and "'catalog.shard_sise'" in line


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("catalog:\n  max_tiles: many\n", "catalog.max_tiles: "),
        ("catalog:\n  shard_size: 0\n", "catalog.shard_size: "),
        ("catalog:\n  splits: [train, val]\n", "catalog.splits.1: "),
        ("data:\n  source: s3\n", "data.source: "),
    ],
)
def test_bad_params_value_exits_2_with_one_line(tmp_path, capsys, yaml_text, named):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    code, stdout, stderr = _gac_here(capsys, "--params", tmp_path / "bad.yaml", "catalog", "--data-dir", tmp_path)
    assert code == 2 and stdout == ""
    (line,) = stderr.splitlines()
    assert line.startswith(f"gac: error: {tmp_path / 'bad.yaml'}: {named}") and "(got " in line


def test_bad_flag_value_exits_2_naming_it(tmp_path, capsys):
    code, _, stderr = _gac_here(
        capsys, "--params", REPO / "params.yaml", "catalog", "--data-dir", tmp_path, "--max-tiles", "0"
    )
    assert code == 2
    (line,) = stderr.splitlines()
    assert line.startswith("gac: error: command line: max_tiles:") and "(got 0)" in line


def test_missing_data_root_via_cli_names_metadata(tmp_path, capsys):
    code, _, stderr = _gac_here(
        capsys, "--params", REPO / "params.yaml", "catalog", "--data-dir", tmp_path / "nowhere",
        "--output-dir", tmp_path / "cat", "--metrics", tmp_path / "m.json",
    )  # fmt: skip
    assert code == 2
    (line,) = stderr.splitlines()
    assert line.startswith(f"gac: error: {tmp_path / 'nowhere' / layout.METADATA_FILE}: not found")
    assert not (tmp_path / "cat").exists()


# -- resume and atomicity --------------------------------------------------------------------------------------------
def test_rebuild_keeps_finished_shards_and_ignores_unfinished_ones(synthetic_root, tmp_path):
    out = tmp_path / "cat"
    _, store = _build(synthetic_root, out, shard_size=4, max_tiles=12)
    assert store.shard_names() == ["00000", "00001", "00002"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]  # nothing half-written is left
    first = _mtimes(out)
    ids = store.index["patch_id"].tolist()

    # A writer killed mid-shard leaves a .tmp- folder (see gac.io.atomic); a killed run also lacks its later shards.
    junk = out / SHARDS / ".tmp-00003-killed" / "00003"
    junk.mkdir(parents=True)
    store.index.head(2).drop(columns=["shard", "row"]).to_parquet(junk / "index.parquet")
    shutil.rmtree(out / SHARDS / "00001")

    report, store = _build(synthetic_root, out, shard_size=4, max_tiles=12)
    again = _mtimes(out)
    assert store.shard_names() == ["00000", "00001", "00002"]
    assert report.tiles == 12 and store.index["patch_id"].tolist() == ids
    for name in ("00000", "00002"):  # finished shards were not rewritten
        kept = {k: v for k, v in first.items() if k.startswith(f"{SHARDS}/{name}/")}
        assert kept and all(again[k] == v for k, v in kept.items())
    assert all(again[k] != v for k, v in first.items() if k.startswith(f"{SHARDS}/00001/"))


def test_changing_the_selection_rebuilds(synthetic_root, tmp_path):
    out = tmp_path / "cat"
    _build(synthetic_root, out, shard_size=4, max_tiles=12)
    first = _mtimes(out)
    report, store = _build(synthetic_root, out, shard_size=4, max_tiles=8)
    assert report.tiles == 8 and store.shard_names() == ["00000", "00001"]
    assert store.index["patch_id"].tolist() == metadata.read_metadata(synthetic_root)["patch_id"].head(8).tolist()
    again = _mtimes(out)
    assert all(again[k] != first[k] for k in again)  # same shard names, but every file written anew
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def test_failed_shard_write_leaves_nothing(tmp_path):
    store = ShardStore(tmp_path / "store")
    index = pd.DataFrame({"patch_id": ["a", "b"]})
    bad = np.empty(2, dtype=object)  # np.save refuses object arrays without pickle: fails mid-shard
    with pytest.raises(ValueError):
        store.write_shard("00000", index, {"s2": np.zeros((2, 3), np.uint16), "s1": bad})
    assert store.shard_names() == []
    assert os.listdir(tmp_path / "store" / SHARDS) == []


def test_the_catalog_does_not_depend_on_the_folder_the_data_is_in(synthetic_root, tmp_path, monkeypatch):
    """Same data in two folders (a fresh clone elsewhere) → byte-identical catalogs, so DVC hashes them alike; and a
    catalog built from one copy is resumed, not rebuilt, from the other."""
    import hashlib

    copies = [tmp_path / "clone-a" / "data", tmp_path / "somewhere" / "else" / "data"]
    for copy in copies:
        shutil.copytree(synthetic_root, copy)

    def files(out: Path) -> dict[str, str]:
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}  # fmt: skip

    built = []
    for i, copy in enumerate(copies):
        out = tmp_path / f"catalog-{i}"
        monkeypatch.chdir(copy.parent)  # the data root as params.yaml names it: "data", relative
        catalog.build(CatalogParams(out=str(out), workers=0), "data", progress=False)
        built.append(files(out))
    assert built[0] == built[1]
    marker = next((tmp_path / "catalog-0" / SHARDS).iterdir())
    before = marker.stat().st_mtime_ns
    monkeypatch.chdir(copies[1].parent)
    catalog.build(CatalogParams(out=str(tmp_path / "catalog-0"), workers=0), "data", progress=False)
    assert marker.stat().st_mtime_ns == before  # resumed: nothing rewritten
