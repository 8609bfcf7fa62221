"""GeoTIFF export of generated tiles, with the input tile's CRS and transform, so QGIS puts them where they belong.

A cache may hold, beside ``opt``, the prediction's calibrated per-pixel, per-band standard deviation ``sigma`` (1 σ,
same shape and DN scale). An export then carries it as *extra bands*, not a sibling file: bands 1–12 are the mean
(``B01`` … ``B12``), bands 13–24 its σ (``B01_sigma`` … ``B12_sigma``). One file keeps the two from drifting apart
(copied, renamed or re-projected alone), and QGIS lists band descriptions in its band picker, so a user picks
``B04_sigma`` by name to see where the model is unsure. The ``GAC_BANDS`` tag says the same in words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gac.io.atomic import atomic_path
from gac.io.store import SIGMA, ShardStore
from gac.sensors import DN_SCALE, S2_BANDS

#: Suffix of a σ band's description (``B04_sigma``).
SIGMA_SUFFIX = "_sigma"


def band_names(count: int, names: tuple[str, ...] = S2_BANDS) -> tuple[str, ...]:
    """Descriptions of an export's ``count`` bands: ``names``, then ``<name>_sigma`` when it holds twice as many."""
    if count == 2 * len(names):
        return (*names, *(f"{name}{SIGMA_SUFFIX}" for name in names))
    return names[:count]


def describe(dst: Any, count: int, georeference: str = "file") -> None:
    """Band descriptions and tags of an open rasterio dataset of ``count`` bands (a tile's GeoTIFF or a scene's COG).

    ``GAC_GEOREFERENCE`` says where the georeference came from (``file`` or ``reconstructed…``), so a reader can tell a
    rebuilt one from one read off the source files; ``GAC_BANDS`` says what the bands hold and in what units.
    """
    names = band_names(count)
    for i, name in enumerate(names, start=1):
        dst.set_band_description(i, name)
    units = f"DN = reflectance x {DN_SCALE:g}"
    what = f"bands 1-{len(S2_BANDS)}: predicted {units}"
    if count == 2 * len(S2_BANDS):
        what += f"; bands {len(S2_BANDS) + 1}-{count}: 1 sigma (standard deviation) of each prediction, same {units}"
    dst.update_tags(GAC_GEOREFERENCE=georeference, GAC_BANDS=what)


def tile_bands(store: ShardStore, shard: str, rows: Any, sigma: bool, key: str = "opt") -> np.ndarray:
    """``(n, C, H, W)`` of ``rows`` (row numbers in ``shard``): ``key``, then the :data:`SIGMA` bands if ``sigma``.

    Callers pass ``sigma=store.has(SIGMA)``, asked once per export: every tile of a store then gets the same bands.
    """
    rows = np.asarray(rows)
    bands = np.asarray(store.array(shard, key)[rows])
    if sigma:
        bands = np.concatenate([bands, np.asarray(store.array(shard, SIGMA)[rows])], axis=1)
    return bands


def write_geotiff(path: str | Path, bands: np.ndarray, meta: Any) -> Path:
    """Write ``bands`` (C, H, W) with ``meta.crs`` / ``meta.transform`` (a catalog index row) atomically, described
    by :func:`describe` (12 mean bands, or 12 mean + 12 σ bands)."""
    import rasterio
    from affine import Affine

    path = Path(path)
    transform = Affine(*list(meta["transform"])[:6])
    profile = {
        "driver": "GTiff",
        "height": bands.shape[1],
        "width": bands.shape[2],
        "count": bands.shape[0],
        "dtype": bands.dtype.name,
        "crs": meta["crs"],
        "transform": transform,
        "compress": "deflate",
    }
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(bands)
        describe(dst, bands.shape[0], str(meta.get("georeference", "file")))
    return path


def export_geotiff(store_root: str | Path, patch_id: str, path: str | Path) -> Path:
    """Write one tile of a store (opt_v1/v2/v3) as a GeoTIFF (with its σ bands when the store has them) with the
    tile's CRS and transform."""
    store = ShardStore(store_root)
    meta = store.rows_for([patch_id]).iloc[0]
    return write_geotiff(path, tile_bands(store, meta["shard"], [meta["row"]], store.has(SIGMA))[0], meta)


def export_geotiffs(store_root: str | Path, folder: str | Path, suffix: str) -> int:
    """Write every tile of a store as ``<folder>/<patch_id><suffix>.tif`` with its tile's CRS and transform (and σ
    bands when the store has them); return how many.

    ``folder`` is replaced as a whole (atomically): it holds exactly the store's tiles, never a file left from a run
    on other tiles. Shard by shard, from the memory-mapped arrays, so the cost grows with the tiles, not their square.
    """
    store = ShardStore(store_root)
    index, sigma = store.index, store.has(SIGMA)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for shard, rows in index.groupby("shard", sort=True):
            for _, meta in rows.iterrows():  # one tile in memory at a time
                bands = tile_bands(store, shard, [meta["row"]], sigma)[0]
                write_geotiff(tmp / f"{meta['patch_id']}{suffix}.tif", bands, meta)
    return len(index)
