"""The two raw-data sources: the real reBEN sample and the synthetic generator, checked against the layout, each
other's conventions and torchgeo's reader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from gac.data import sample, synthetic
from gac.data.layout import (
    METADATA_COLUMNS,
    REFERENCE_DIR,
    S1_BANDS,
    S2_BANDS,
    S2_GSD,
    SPLITS,
    reference_map_path,
    s1_band_path,
    s2_band_path,
)
from gac.errors import GacError


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


# --- the real sample -------------------------------------------------------------------------------------------------


def test_sample_metadata(sample_root: Path) -> None:
    meta = pd.read_parquet(sample_root / "metadata.parquet")
    assert tuple(meta.columns) == METADATA_COLUMNS
    assert len(meta) == 21
    assert set(meta["split"]) == set(SPLITS)
    assert meta["patch_id"].str.contains("_T33UUP_").all()
    assert (meta["country"] == "Austria").all()
    assert meta["patch_id"].is_unique
    assert all(len(labels) > 0 for labels in meta["labels"])
    # 18 rows of the wheel's metadata.parquet + 3 T33UUP rows of its snow/cloud file, whose flags are real.
    assert int(meta["contains_cloud_or_shadow"].sum()) == 3


def test_sample_layout(sample_root: Path) -> None:
    meta = pd.read_parquet(sample_root / "metadata.parquet")
    for patch_id, s1_name in zip(meta["patch_id"], meta["s1_name"], strict=True):
        for band in S2_BANDS:
            with rasterio.open(s2_band_path(sample_root, patch_id, band)) as src:
                side = 1200 // S2_GSD[band]
                assert (src.count, src.height, src.width, src.dtypes[0]) == (1, side, side, "uint16"), band
                assert src.crs.to_epsg() == 32633
                assert src.tags()["GAC_GEOREFERENCE"] == "reconstructed:T33UUP-patch-grid"
        for band in S1_BANDS:
            with rasterio.open(s1_band_path(sample_root, s1_name, band)) as src:
                assert (src.count, src.height, src.width, src.dtypes[0]) == (1, 120, 120, "float32"), band
                assert src.crs.to_epsg() == 32633
                assert src.tags()["GAC_GEOREFERENCE"] == "reconstructed:T33UUP-patch-grid"
    # The wheel has no reference maps, so none are faked; the folder exists for torchgeo.
    assert (sample_root / REFERENCE_DIR).is_dir()
    assert not any((sample_root / REFERENCE_DIR).iterdir())
    assert not list(sample_root.rglob("*.aux.xml"))


def test_sample_georeference_rule(sample_root: Path) -> None:
    """Patch X=27, Y=56 of T33UUP: upper-left (300000 + 27·1200, 5400000 − 56·1200) in EPSG:32633."""
    patch_id = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_27_56"
    s1_name = "S1B_IW_GRDH_1SDV_20170612T165809_33UUP_27_56"
    ulx, uly = 332400.0, 5332800.0
    for band, gsd in (("B02", 10), ("B05", 20), ("B01", 60)):
        with rasterio.open(s2_band_path(sample_root, patch_id, band)) as src:
            assert tuple(src.transform)[:6] == (gsd, 0.0, ulx, 0.0, -gsd, uly)
            assert tuple(src.bounds) == (ulx, uly - 1200, ulx + 1200, uly)
    for band in S1_BANDS:
        with rasterio.open(s1_band_path(sample_root, s1_name, band)) as src:
            assert tuple(src.transform)[:6] == (10.0, 0.0, ulx, 0.0, -10.0, uly)


def test_sample_grid_axes_match_pixels(sample_root: Path) -> None:
    """The rule puts ..._27_56 directly south of ..._27_55: their seam must be as smooth as the inside of a patch."""
    prefix = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_"
    north = _read(s2_band_path(sample_root, prefix + "27_55", "B08")).astype(float)
    south = _read(s2_band_path(sample_root, prefix + "27_56", "B08")).astype(float)
    seam = np.abs(north[-1] - south[0]).mean()
    inside = np.abs(north[-2] - north[-1]).mean()
    swapped = np.abs(north[:, -1] - south[:, 0]).mean()  # what X/Y swapped would claim is a seam
    assert seam < 1.5 * inside
    assert swapped > 2 * seam


def test_sample_pixels_are_the_wheels(sample_root: Path) -> None:
    entries, _ = sample._read_wheel(sample.fetch_wheel(sample_root.parent / "wheel-cache"))
    patch_id = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_38_90"
    s1_name = "S1B_IW_GRDH_1SDV_20170612T165809_33UUP_38_90"
    for band in S2_BANDS:
        np.testing.assert_array_equal(_read(s2_band_path(sample_root, patch_id, band)), entries[patch_id][band])
    for band in S1_BANDS:
        np.testing.assert_array_equal(_read(s1_band_path(sample_root, s1_name, band)), entries[s1_name][band])


def test_sample_skips_t35vnj_with_reason(sample_root: Path) -> None:
    report = sample.materialise_sample(sample_root)  # reuses the finished root
    assert report.reused
    assert len(report.written) == 21
    assert sorted(report.skipped) == [
        "S2A_MSIL2A_20171101T094131_N9999_R036_T35VNJ_00_00",
        "S2A_MSIL2A_20171101T094131_N9999_R036_T35VNJ_13_13",
        "S2A_MSIL2A_20171101T094131_N9999_R036_T35VNJ_23_24",
    ]
    assert all("T35VNJ" in reason and "\n" not in reason for reason in report.skipped.values())
    assert not list((sample_root / "BigEarthNet-S2").glob("*T35VNJ*"))


def test_sample_is_byte_deterministic(sample_root: Path, tmp_path: Path) -> None:
    report = sample.materialise_sample(tmp_path / "again", cache_dir=sample_root.parent / "wheel-cache")
    assert not report.reused and len(report.written) == 21
    assert _tree_hashes(tmp_path / "again") == _tree_hashes(sample_root)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no .tmp- leftovers


def test_sample_cli_reports(sample_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sample.main(["--root", str(sample_root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("21 real BigEarthNet v2 patches already present")
    assert sum(line.startswith("skipped ") and "T35VNJ" in line for line in out) == 3


def test_wheel_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    (tmp_path / sample.WHEEL_FILE).write_bytes(b"not the wheel")
    with pytest.raises(GacError, match="sha256") as err:
        sample.fetch_wheel(tmp_path)
    assert "\n" not in str(err.value)


def test_sample_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(GacError, match="--force"):
        sample.materialise_sample(tmp_path, cache_dir=tmp_path / "cache")
    assert (tmp_path / "keep.txt").exists()


# --- the synthetic generator -----------------------------------------------------------------------------------------


def test_synthetic_layout_and_metadata(synthetic_root: Path) -> None:
    meta = pd.read_parquet(synthetic_root / "metadata.parquet")
    assert tuple(meta.columns) == METADATA_COLUMNS
    assert len(meta) == 24 and meta["patch_id"].is_unique
    assert meta["split"].value_counts().to_dict() == {"train": 8, "validation": 8, "test": 8}
    assert meta["country"].nunique() >= 4
    assert {pid.split("_")[2][:8] for pid in meta["patch_id"]} >= {"20170613", "20180212"}  # summer and winter
    for row in meta.itertuples():
        assert row.s1_name.split("_")[-2:] == row.patch_id.split("_")[-2:]
        assert row.s1_name.split("_")[-3] == row.patch_id.split("_")[-3][1:]
        lc = _read(reference_map_path(synthetic_root, row.patch_id))
        assert lc.dtype == np.uint16 and lc.shape == (120, 120)
        assert sorted(row.labels) == sorted({synthetic.CLC_TO_BEN19[int(c)] for c in np.unique(lc)})
        with rasterio.open(s1_band_path(synthetic_root, row.s1_name, "VV")) as s1:
            s1_geo = (s1.crs, s1.bounds, s1.dtypes[0], s1.shape)
        assert s1_geo[2:] == ("float32", (120, 120))
        for band in S2_BANDS:
            with rasterio.open(s2_band_path(synthetic_root, row.patch_id, band)) as src:
                side = 1200 // S2_GSD[band]
                assert (src.dtypes[0], src.shape) == ("uint16", (side, side))
                assert (src.crs, src.bounds) == s1_geo[:2]
                assert src.crs.to_epsg() in {32629, 32633, 32634, 32635}
                assert src.tags()["GAC_SOURCE"] == "synthetic:seed=0"


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = synthetic.generate(tmp_path / "a", 6, seed=3)
    b = synthetic.generate(tmp_path / "b", 6, seed=3, workers=2)  # a process pool must not change a byte
    c = synthetic.generate(tmp_path / "c", 6, seed=4)
    assert a == b and a != c
    assert _tree_hashes(tmp_path / "a") == _tree_hashes(tmp_path / "b")
    assert _tree_hashes(tmp_path / "a") != _tree_hashes(tmp_path / "c")


def _class_means(root: Path, band: str, sensor: str) -> dict[int, float]:
    meta = pd.read_parquet(root / "metadata.parquet")
    sums: dict[int, list[float]] = {}
    for row in meta.itertuples():
        lc = _read(reference_map_path(root, row.patch_id))
        path = s1_band_path(root, row.s1_name, band) if sensor == "s1" else s2_band_path(root, row.patch_id, band)
        values = _read(path).astype(float)
        for code in np.unique(lc):
            sums.setdefault(int(code), []).append(float(values[lc == code].mean()))
    return {code: float(np.mean(v)) for code, v in sums.items()}


def test_synthetic_physics(synthetic_root: Path) -> None:
    vv = _class_means(synthetic_root, "VV", "s1")
    vh = _class_means(synthetic_root, "VH", "s1")
    nir = _class_means(synthetic_root, "B08", "s2")
    water, urban, forests = 512, 112, (311, 312, 313)
    assert vv[water] < vv[urban] - 10 and vh[water] < vh[urban] - 10
    assert all(vv[f] > vv[water] for f in forests if f in vv)
    assert all(vh[c] < vv[c] for c in vv)  # cross-pol is always weaker
    assert nir[water] < 400
    assert all(nir[f] > nir[water] + 1500 for f in forests if f in nir)


def test_synthetic_boundaries_shared(synthetic_root: Path) -> None:
    """Class edges of the reference map are where both S2 and S1 change most."""
    meta = pd.read_parquet(synthetic_root / "metadata.parquet")
    ratios = {"B08": [], "VV": []}
    for row in meta.itertuples():
        lc = _read(reference_map_path(synthetic_root, row.patch_id))
        edge = lc[:, 1:] != lc[:, :-1]
        if edge.sum() < 20:
            continue
        for band, path in (
            ("B08", s2_band_path(synthetic_root, row.patch_id, "B08")),
            ("VV", s1_band_path(synthetic_root, row.s1_name, "VV")),
        ):
            img = _read(path).astype(float)
            if band == "VV":  # average speckle away along rows before differencing
                img = (img[:-2] + img[1:-1] + img[2:]) / 3
                edge_b = edge[1:-1]
            else:
                edge_b = edge
            step = np.abs(img[:, 1:] - img[:, :-1])
            ratios[band].append(step[edge_b].mean() / step[~edge_b].mean())
    assert len(ratios["B08"]) >= 10
    assert np.median(ratios["B08"]) > 3
    assert np.median(ratios["VV"]) > 1.5


def test_synthetic_broken_tiles_are_broken(tmp_path: Path) -> None:
    kinds = {"missing_band": 1, "corrupt_tiff": 1, "wrong_shape": 1, "nan_sar": 1}
    ids = synthetic.generate(tmp_path / "b", 7, seed=1, broken=kinds)
    broken = synthetic.broken_patches(tmp_path / "b")
    assert sorted(broken.values()) == sorted(kinds)
    meta = pd.read_parquet(tmp_path / "b" / "metadata.parquet").set_index("patch_id")
    assert list(meta.index) == ids and set(broken) <= set(ids)  # broken tiles stay listed
    root = tmp_path / "b"
    for patch_id, kind in broken.items():
        s1_name = meta.loc[patch_id, "s1_name"]
        if kind == "missing_band":
            assert not s2_band_path(root, patch_id, "B05").exists()
        elif kind == "corrupt_tiff":
            with pytest.raises(rasterio.errors.RasterioIOError):
                rasterio.open(s2_band_path(root, patch_id, "B04")).close()
        elif kind == "wrong_shape":
            assert _read(s2_band_path(root, patch_id, "B03")).shape != (120, 120)
        elif kind == "nan_sar":
            assert np.isnan(_read(s1_band_path(root, s1_name, "VV"))).any()
    for patch_id in set(ids) - set(broken):  # the rest are intact
        for band in S2_BANDS:
            assert _read(s2_band_path(root, patch_id, band)).shape == (1200 // S2_GSD[band],) * 2
        assert np.isfinite(_read(s1_band_path(root, meta.loc[patch_id, "s1_name"], "VV"))).all()
    # Same seed, same broken choice.
    synthetic.generate(tmp_path / "b2", 7, seed=1, broken=kinds)
    assert synthetic.broken_patches(tmp_path / "b2") == broken


@pytest.mark.parametrize(
    ("broken", "message"),
    [({"melted": 1}, "unknown kinds"), ({"nan_sar": 5}, "only n_tiles"), ({"nan_sar": -1}, "non-negative")],
)
def test_synthetic_rejects_bad_broken(tmp_path: Path, broken: dict[str, int], message: str) -> None:
    with pytest.raises(GacError, match=message):
        synthetic.generate(tmp_path / "x", 4, broken=broken)
    assert not (tmp_path / "x").exists()


# --- torchgeo reads both ---------------------------------------------------------------------------------------------


def test_torchgeo_reads_synthetic(synthetic_root: Path) -> None:
    from torchgeo.datasets import BigEarthNetV2

    ds = BigEarthNetV2(root=str(synthetic_root), split="test", bands="all")
    assert len(ds) == 8
    meta = pd.read_parquet(synthetic_root / "metadata.parquet")
    test_rows = meta[meta["split"] == "test"].reset_index(drop=True)
    for i in range(3):
        item = ds[i]
        assert tuple(item["image_s2"].shape) == (12, 120, 120)
        assert tuple(item["image_s1"].shape) == (2, 120, 120)
        assert tuple(item["mask"].shape) == (1, 120, 120)
        assert int(item["label"].sum()) == len(test_rows.loc[i, "labels"])
        # torchgeo sorts S2 files into band order: index 1 is B02 at 10 m, read without resampling.
        b02 = _read(s2_band_path(synthetic_root, test_rows.loc[i, "patch_id"], "B02"))
        np.testing.assert_array_equal(item["image_s2"][1].numpy(), b02.astype(np.float32))


def test_torchgeo_reads_sample_images(sample_root: Path) -> None:
    from torchgeo.datasets import BigEarthNetV2

    ds = BigEarthNetV2(root=str(sample_root), split="test", bands="all")
    assert len(ds) == 7  # 6 of metadata.parquet + 1 cloud/shadow row
    for i in range(3):
        assert tuple(ds._load_image(i, "s2").shape) == (12, 120, 120)
        assert tuple(ds._load_image(i, "s1").shape) == (2, 120, 120)
        assert int(ds._load_target(i).sum()) >= 1
    # __getitem__ also loads the CORINE map, which the real sample does not have (and GAC does not invent).
    with pytest.raises(rasterio.errors.RasterioIOError):
        ds[0]
