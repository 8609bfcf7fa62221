"""GeoTIFF exports with σ bands, and scenes as Cloud-Optimized GeoTIFFs (:mod:`gac.io.geotiff`, :mod:`gac.io.cog`).

The store is written here (:meth:`ShardStore.write_shard`): random ``opt`` and ``sigma`` DN for the tiles of one
product on the BigEarthNet grid (an L of four 1200 m cells with a hole, spread over two shards in shuffled order),
one tile of the same product name in another UTM zone, and a lone tile of another product. The scene's COG is
checked against each tile's own GeoTIFF: the same pixels (mean and σ bands) and the same georeference.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.windows import from_bounds

from gac.data.layout import s2_tile_dir
from gac.errors import GacError
from gac.io import cog
from gac.io.geotiff import export_geotiffs
from gac.io.store import ShardStore

PRODUCT = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP"
OTHER = "S2B_MSIL2A_20170614T100029_N9999_R122_T32TQT"
#: (product, row south, col east, CRS) of each tile; PRODUCT's cells (0,0) (0,1) (1,1) (2,0) leave (1,0) and (2,1)
#: uncovered, so the scene has a hole and a notch to be nodata.
TILES = [(PRODUCT, 0, 1, "EPSG:32633"), (OTHER, 4, 7, "EPSG:32632"), (PRODUCT, 2, 0, "EPSG:32633"),
         (PRODUCT, 0, 0, "EPSG:32633"), (PRODUCT, 5, 5, "EPSG:32634"), (PRODUCT, 1, 1, "EPSG:32633")]  # fmt: skip
BLOCK = 64  # small enough that a 240 x 360 px scene gets overviews (GDAL makes none for a scene within a block)


def rows(tiles=TILES, shift_m: float = 0.0) -> pd.DataFrame:
    """Catalog-like index rows: BigEarthNet ids ``<product>_<col>_<row>`` and the 1200 m grid's transforms."""
    return pd.DataFrame(
        {
            "patch_id": [f"{p}_{c}_{r}" for p, r, c, _ in tiles],
            "crs": [crs for *_, crs in tiles],
            "transform": [
                [10.0, 0.0, 300000.0 + 1200 * c + shift_m * (k == 0), 0.0, -10.0, 5400000.0 - 1200 * r]
                for k, (_, r, c, _) in enumerate(tiles)
            ],  # fmt: skip
        }
    )


def write_store(root: Path, index: pd.DataFrame, sigma: bool = True) -> ShardStore:
    rng = np.random.default_rng(7)
    n = len(index)
    arrays = {"opt": rng.integers(0, 10001, (n, 12, 120, 120), dtype=np.uint16)}
    if sigma:
        arrays["sigma"] = rng.integers(0, 800, (n, 12, 120, 120), dtype=np.uint16)
    store = ShardStore(root)
    half = n // 2
    store.write_shard("00000", index.iloc[:half], {k: v[:half] for k, v in arrays.items()})
    store.write_shard("00001", index.iloc[half:], {k: v[half:] for k, v in arrays.items()})
    store.finalize()
    return store


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """The store, every tile's GeoTIFF and every scene's COG."""
    tmp = tmp_path_factory.mktemp("cog")
    store = write_store(tmp / "opt_v3", rows())
    count = export_geotiffs(store.root, tmp / "geotiff", "_opt_v3")
    scenes = cog.write_scenes(store.root, tmp / "scenes", s2_tile_dir, blocksize=BLOCK)
    return {"tmp": tmp, "store": store, "count": count, "scenes": scenes}


def tiff_ifds(path: Path) -> tuple[list[tuple[int, int, int]], bytes]:
    """``[(IFD offset, image width, offset of its first image block)]`` along a classic TIFF's IFD chain, and the
    bytes after the header (where GDAL puts a COG's structural metadata). A reader of its own: GDAL's COG validator
    (``osgeo_utils``) is not installed with rasterio."""
    data = path.read_bytes()
    order = {b"II": "<", b"MM": ">"}[data[:2]]
    assert struct.unpack(order + "H", data[2:4])[0] == 42, "not a classic TIFF"
    (offset,) = struct.unpack(order + "I", data[4:8])
    chain = []
    while offset:
        (n,) = struct.unpack(order + "H", data[offset : offset + 2])
        tags = {}
        for k in range(n):
            tag, kind, count, value = struct.unpack(order + "HHII", data[offset + 2 + 12 * k : offset + 14 + 12 * k])
            if tag in (256, 324):  # ImageWidth, TileOffsets
                size = {3: "H", 4: "I"}[kind]
                stop = value + struct.calcsize(size) * count
                tags[tag] = [value] if count == 1 else struct.unpack(order + size * count, data[value:stop])
        chain.append((offset, tags[256][0], min(v for v in tags[324] if v)))
        (offset,) = struct.unpack(order + "I", data[offset + 2 + 12 * n : offset + 6 + 12 * n])
    return chain, data[8:400]


def test_geotiffs_carry_sigma_bands_named_for_qgis(exported):
    store, tmp = exported["store"], exported["tmp"]
    assert exported["count"] == len(TILES)
    meta = store.index.iloc[3]
    with rasterio.open(tmp / "geotiff" / f"{meta['patch_id']}_opt_v3.tif") as src:
        assert src.count == 24
        assert src.descriptions[:3] == ("B01", "B02", "B03") and src.descriptions[12:14] == ("B01_sigma", "B02_sigma")
        assert "1 sigma" in src.tags()["GAC_BANDS"] and "reflectance x 10000" in src.tags()["GAC_BANDS"]
        pixels = src.read()
    np.testing.assert_array_equal(pixels[:12], store.array(meta["shard"], "opt")[meta["row"]])
    np.testing.assert_array_equal(pixels[12:], store.array(meta["shard"], "sigma")[meta["row"]])


def test_without_sigma_an_export_is_the_twelve_mean_bands(tmp_path):
    store = write_store(tmp_path / "opt_v3", rows(TILES[:2]), sigma=False)
    cog.write_scenes(store.root, tmp_path / "scenes", s2_tile_dir)
    export_geotiffs(store.root, tmp_path / "geotiff", "")
    for path in [*(tmp_path / "scenes").iterdir(), *(tmp_path / "geotiff").iterdir()]:
        with rasterio.open(path) as src:
            assert src.count == 12 and src.descriptions[-1] == "B12", path.name
            assert "sigma" not in src.tags()["GAC_BANDS"]


def test_one_scene_per_product_and_crs(exported):
    assert exported["scenes"] == {PRODUCT + "_EPSG32633": 4, PRODUCT + "_EPSG32634": 1, OTHER: 1}
    assert sorted(p.name for p in (exported["tmp"] / "scenes").iterdir()) == sorted(
        f"{name}.tif" for name in exported["scenes"]
    )  # no temporary strips file or .tmp- folder left


def test_scene_is_a_cloud_optimized_geotiff(exported):
    path = exported["tmp"] / "scenes" / f"{PRODUCT}_EPSG32633.tif"
    with rasterio.open(path) as src:
        assert (src.height, src.width) == (360, 240)  # three cells south, two east
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.profile["tiled"] and src.block_shapes[0] == (BLOCK, BLOCK)
        # GDAL's rule: halve until the image fits in one block (360 -> 180 -> 90 -> 45 px)
        assert src.overviews(1) == [2, 4, 8] and src.overviews(24) == [2, 4, 8]
        assert src.profile["compress"] == "deflate" and src.nodata == cog.NODATA
        assert src.descriptions[11:13] == ("B12", "B01_sigma")
    chain, head = tiff_ifds(path)
    assert b"LAYOUT=IFDS_BEFORE_DATA" in head
    offsets, widths, data = zip(*chain, strict=True)
    assert widths == (240, 120, 60, 30), "the full-resolution image first, then overviews in decreasing size"
    assert list(offsets) == sorted(offsets) and max(offsets) < min(data), "every IFD before any image data"
    assert list(data) == sorted(data, reverse=True), "image data from the smallest overview to the full image"


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # rasterio's windows multiply Affine with `*`
def test_each_tile_inside_its_scene_is_its_own_geotiff(exported):
    tmp, index = exported["tmp"], exported["store"].index
    covered = {}
    for pid, crs in zip(index["patch_id"], index["crs"], strict=True):
        name = s2_tile_dir(pid) + ("" if s2_tile_dir(pid) == OTHER else f"_{crs.replace(':', '')}")
        with (
            rasterio.open(tmp / "geotiff" / f"{pid}_opt_v3.tif") as tile,
            rasterio.open(tmp / f"scenes/{name}.tif") as scene,
        ):
            window = from_bounds(*tile.bounds, transform=scene.transform).round_offsets().round_lengths()
            assert scene.crs == tile.crs
            assert scene.window_transform(window) == tile.transform
            np.testing.assert_array_equal(scene.read(window=window), tile.read())
            covered.setdefault(name, []).append(window)
    with rasterio.open(tmp / "scenes" / f"{PRODUCT}_EPSG32633.tif") as scene:
        pixels = scene.read(1)
    for window in covered[f"{PRODUCT}_EPSG32633"]:
        pixels[window.toslices()] = 0
    assert (pixels[120:240, 0:120] == cog.NODATA).all() and (pixels[240:, 120:] == cog.NODATA).all()
    assert set(np.unique(pixels)) == {0, cog.NODATA}, "only the hole and the notch are not from a tile"


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (rows(TILES[2:4], shift_m=5.0), r"scene S2A\S+: tile \S+_0_2 sits 0\.500 px off the pixel grid"),
        (rows([TILES[3], TILES[0]], shift_m=600.0), r"tiles \S+_0_0 and \S+_1_0 overlap \(120 x 60 px\)"),
        (
            rows(TILES[2:4]).assign(transform=lambda d: [[20.0, 0, 0, 0, -20.0, 0], d["transform"][1]]),
            r"tile \S+_0_0 has transform pixel size \(10, -10\) .* expected north-up \(20, -20\)",
        ),
    ],
    ids=["half-pixel-shift", "overlap", "pixel-size"],
)
def test_tiles_off_one_grid_are_refused_in_one_line(tmp_path, index, message):
    store = write_store(tmp_path / "opt_v3", index.assign(crs="EPSG:32633"), sigma=False)
    with pytest.raises(GacError, match=message) as caught:
        cog.write_scenes(store.root, tmp_path / "scenes", s2_tile_dir)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "scenes").exists()
