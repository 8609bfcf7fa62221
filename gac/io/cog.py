"""Scenes as Cloud-Optimized GeoTIFFs: the tiles of one Sentinel-2 product, on their common grid, in one file.

A GIS user wants a scene, not 120 px patches. BigEarthNet cuts each Sentinel-2 product into 1200 m tiles without
overlap, all on the product's UTM grid, so the tiles of one product (and one CRS) fit side by side into one raster:

* **The grid** (:func:`scene_grid`): the union of the tiles' bounds at their shared pixel size. Every tile's
  transform must be north-up with that pixel size and put the tile a whole number of pixels from the scene's corner;
  otherwise, or where two tiles overlap, the scene is refused in one line naming the tile: blending or resampling
  here would hand out pixels no model made. Tiles of a ``stage1.mosaic`` run were generated in blended windows and
  cut back at their exact pixels, so placing them at their transforms *is* the blended scene.
* **The bands**: as every GeoTIFF export (:mod:`gac.io.geotiff`): the 12 mean bands, then their 12 σ bands when the
  store has ``sigma``; band descriptions ``B01`` … ``B12_sigma``; pixels no tile covers are :data:`NODATA`.
* **The file**: GDAL's ``COG`` driver (tiled :data:`BLOCKSIZE` px blocks, overviews down to one block, deflate,
  IFDs before the image data), written atomically (:func:`gac.io.atomic.atomic_path`). Overviews average every band,
  nodata left out; a σ band's overview is the mean σ of the pixels it covers (how unsure the model is there, zoomed
  out), not the σ of their mean.

Memory: a real product is up to 10980² px × 24 bands (5.8 GB as uint16), so it is never held whole. The scene is
assembled one :data:`BLOCKSIZE` block at a time (12.6 MB with σ, plus the tiles touching it, read from the store's
memory maps) into a temporary tiled, sparse GTiff beside the output (blocks no tile touches are never written). GDAL
then translates that into the COG; its overviews are computed one block row at a time through a block cache of
:data:`CACHE_BLOCK_ROWS` block rows, so memory grows with the scene's *width*, not its area. Measured peaks (24
bands, 2 cores): 0.85 GB in 9 s for the sample's product (21 tiles spread over 6120 × 5400 px), 1.4 GB in 30 s for
tiles spanning a whole product (10920 × 10920 px).
The temporary file goes with the atomic write's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gac.errors import GacError
from gac.io.atomic import atomic_path
from gac.io.geotiff import describe, tile_bands
from gac.io.store import SIGMA, ShardStore

if TYPE_CHECKING:
    from rasterio.windows import Window

#: Block (tile) size of the COG in px: GDAL's default, what web viewers and QGIS read in one request.
BLOCKSIZE = 512
#: Value of pixels no tile covers: the uint16 DN no prediction reaches in practice (reflectance 6.55; the caches
#: clip to it), unlike 0, which is a valid prediction and a valid σ.
NODATA = 65535
#: Rows of the scene assembled in memory at a time (see the module docstring's memory bound).
STRIP_ROWS = 256
#: GDAL's block cache while it computes the overviews, in block rows of the scene (all bands, full width), and at
#: least :data:`MIN_CACHE` bytes. Overviews are computed one block row at a time (``GDAL_OVR_CHUNK_MAX_SIZE``); with
#: less cache GDAL reads each block many times (measured: 6120 x 5400 px x 24 bands, 2 cores: 37 s with 3 block rows
#: of cache, 166 s with 256 MB and GDAL's default chunks).
CACHE_BLOCK_ROWS = 3
MIN_CACHE = 256 << 20
#: How far (in px) a tile's corner may sit from the scene's pixel grid: float noise of a transform, not a shift.
GRID_TOLERANCE_PX = 1e-6


@dataclass(frozen=True)
class Grid:
    """A scene's raster: its CRS, transform (6 affine coefficients), size, and each tile's pixel offset in it."""

    crs: str
    transform: tuple[float, ...]
    height: int
    width: int
    offsets: pd.DataFrame  # patch_id, shard, row, y, x (px from the scene's upper-left corner)


def scene_grid(rows: pd.DataFrame, tile_shape: tuple[int, int], name: str) -> Grid:
    """The common grid of the tiles ``rows`` (store index rows of one CRS), tiles of ``tile_shape`` px (H, W) each.

    Raises :class:`GacError` (one line, naming the scene and the tile) for a rotated or flipped transform, a pixel
    size unlike the first tile's, a tile off the grid by a fraction of a pixel, or two tiles that overlap.
    """
    t = np.array([list(tr)[:6] for tr in rows["transform"]], dtype=np.float64)
    a, e = t[0, 0], t[0, 4]
    for pid, (ta, tb, _, td, te, _) in zip(rows["patch_id"], t, strict=True):
        if tb or td or ta <= 0 or te >= 0 or (ta, te) != (a, e):
            raise GacError(
                f"scene {name}: tile {pid} has transform pixel size ({ta:g}, {te:g}) and rotation ({tb:g}, {td:g}); "
                f"expected north-up ({a:g}, {e:g}) like the scene's first tile (tiles of one product share a grid)"
            )
    x0, y0 = t[:, 2].min(), t[:, 5].max()
    x, y = (t[:, 2] - x0) / a, (y0 - t[:, 5]) / -e
    off = np.maximum(np.abs(x - np.rint(x)), np.abs(y - np.rint(y)))
    if (off > GRID_TOLERANCE_PX).any():
        i = int(off.argmax())
        raise GacError(
            f"scene {name}: tile {rows['patch_id'].iloc[i]} sits {off[i]:.3f} px off the pixel grid of the "
            f"scene's other tiles (expected whole-pixel offsets; its transform {tuple(t[i])})"
        )
    h, w = tile_shape
    offsets = rows[["patch_id", "shard", "row"]].assign(y=np.rint(y).astype(int), x=np.rint(x).astype(int))
    _refuse_overlaps(offsets, h, w, name)
    transform = (a, 0.0, x0, 0.0, e, y0)
    return Grid(str(rows["crs"].iloc[0]), transform, int(offsets["y"].max()) + h, int(offsets["x"].max()) + w, offsets)


def _refuse_overlaps(offsets: pd.DataFrame, h: int, w: int, name: str) -> None:
    """One line naming two tiles that overlap; each tile is compared with those of its 3 × 3 neighbouring buckets of
    tile size only, so the check grows with the tiles, not their square."""
    buckets: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for pid, y, x in zip(offsets["patch_id"], offsets["y"], offsets["x"], strict=True):
        by, bx = y // h, x // w
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for other, oy, ox in buckets.get((by + dy, bx + dx), ()):
                    if abs(oy - y) < h and abs(ox - x) < w:
                        raise GacError(
                            f"scene {name}: tiles {other} and {pid} overlap ({h - abs(oy - y)} x {w - abs(ox - x)} "
                            "px); a scene needs tiles that do not (BigEarthNet's tiles of one product never do)"
                        )
        buckets.setdefault((by, bx), []).append((pid, y, x))


def write_scene(store: ShardStore, rows: pd.DataFrame, path: str | Path, name: str, blocksize: int = BLOCKSIZE) -> Path:
    """Write the tiles ``rows`` (store index rows of one scene) as one COG at ``path`` (see the module docstring)."""
    sigma = store.has(SIGMA)
    first = tile_bands(store, rows["shard"].iloc[0], [rows["row"].iloc[0]], sigma)[0]
    grid = scene_grid(rows, first.shape[1:], name)
    georeference = ", ".join(sorted({str(g) for g in rows.get("georeference", pd.Series(["file"]))}))
    with atomic_path(path) as tmp:
        blocks = tmp.with_name(f"{tmp.stem}.blocks.tif")
        _write_blocks(store, grid, first, sigma, blocks, blocksize, georeference)
        _translate_to_cog(blocks, tmp, blocksize * grid.width * first.shape[0] * first.itemsize, blocksize)
    return Path(path)


def _write_blocks(store: ShardStore, grid: Grid, first: np.ndarray, sigma: bool, path: Path, blocksize: int,
                  georeference: str) -> None:  # fmt: skip
    """The scene as a tiled, sparse GTiff, one ``blocksize`` block in memory at a time; blocks no tile touches are
    not written (they read as :data:`NODATA`), so a scene of scattered tiles costs what its tiles cost."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff", "height": grid.height, "width": grid.width, "count": first.shape[0],
        "dtype": first.dtype.name, "crs": grid.crs, "transform": Affine(*grid.transform), "nodata": NODATA,
        "tiled": True, "blockxsize": blocksize, "blockysize": blocksize, "sparse_ok": True,
        "compress": "deflate", "zlevel": 1, "predictor": 2, "bigtiff": "if_safer",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        describe(dst, first.shape[0], georeference)
        for top in range(0, grid.height, blocksize):
            for left in range(0, grid.width, blocksize):
                window = Window(left, top, min(blocksize, grid.width - left), min(blocksize, grid.height - top))
                pixels = _window(store, grid, window, first, sigma)
                if pixels is not None:
                    dst.write(pixels, window=window)


def _translate_to_cog(blocks: Path, path: Path, block_row: int, blocksize: int) -> None:
    """GDAL's ``COG`` driver from the blocks file to ``path``, computing the overviews one block row (``block_row``
    bytes: all bands, full width) at a time through a cache of :data:`CACHE_BLOCK_ROWS` of them."""
    import rasterio
    import rasterio.shutil

    with rasterio.Env(GDAL_CACHEMAX=max(MIN_CACHE, CACHE_BLOCK_ROWS * block_row), GDAL_OVR_CHUNK_MAX_SIZE=block_row):
        rasterio.shutil.copy(blocks, path, driver="COG", BLOCKSIZE=blocksize, COMPRESS="DEFLATE", PREDICTOR="YES",
                             OVERVIEWS="AUTO", OVERVIEW_RESAMPLING="AVERAGE", BIGTIFF="IF_SAFER")  # fmt: skip


def _window(store: ShardStore, grid: Grid, window: Window, first: np.ndarray, sigma: bool) -> np.ndarray | None:
    """The scene's pixels in ``window``, :data:`NODATA` where no tile is; ``None`` when no tile touches it."""
    h, w = first.shape[1:]
    top, left, bottom, right = (
        window.row_off,
        window.col_off,
        window.row_off + window.height,
        window.col_off + window.width,
    )
    o = grid.offsets
    touching = o[(o["y"] < bottom) & (o["y"] + h > top) & (o["x"] < right) & (o["x"] + w > left)]
    if touching.empty:
        return None
    pixels = np.full((first.shape[0], window.height, window.width), NODATA, dtype=first.dtype)
    for shard, row, y, x in touching[["shard", "row", "y", "x"]].itertuples(index=False):
        y0, y1, x0, x1 = max(top, y), min(bottom, y + h), max(left, x), min(right, x + w)
        tile = tile_bands(store, shard, [row], sigma)[0]
        pixels[:, y0 - top : y1 - top, x0 - left : x1 - left] = tile[:, y0 - y : y1 - y, x0 - x : x1 - x]
    return pixels


def write_scenes(
    store_root: str | Path, folder: str | Path, scene_of: Callable[[str], str], blocksize: int = BLOCKSIZE
) -> dict[str, int]:
    """One COG per scene of the store at ``store_root`` as ``<folder>/<scene>.tif``; returns ``{scene: tiles}``.

    A scene is the tiles of one ``scene_of(patch_id)`` (e.g. the Sentinel-2 product of a BigEarthNet patch id) and one
    CRS; a product seen in two CRSs gets two scenes, named ``<product>_<crs>``. ``folder`` is replaced as a whole, so
    it never keeps a scene of an earlier run.
    """
    store = ShardStore(store_root)
    index = store.index.assign(_scene=lambda d: d["patch_id"].map(scene_of), _crs=lambda d: d["crs"].astype(str))
    crs_count = index.groupby("_scene")["_crs"].nunique()
    written = {}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for (scene, crs), rows in index.groupby(["_scene", "_crs"], sort=True):
            name = scene if crs_count[scene] == 1 else f"{scene}_{crs.replace(':', '')}"
            write_scene(store, rows.reset_index(drop=True), tmp / f"{name}.tif", name, blocksize)
            written[name] = len(rows)
    return written
