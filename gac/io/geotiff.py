"""GeoTIFF export of generated tiles, with the input tile's CRS and transform, so QGIS puts them where they belong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gac.io.atomic import atomic_path
from gac.io.store import ShardStore
from gac.sensors import S2_BANDS


def write_geotiff(path: str | Path, bands: np.ndarray, meta: Any, names: tuple[str, ...] = S2_BANDS) -> Path:
    """Write ``bands`` (C, H, W) with ``meta.crs`` / ``meta.transform`` (a catalog index row) atomically.

    Band descriptions carry the S2 band names; the georeference origin (``file`` or ``reconstructed…``) goes into a
    ``GAC_GEOREFERENCE`` tag so a reader can tell a rebuilt georeference from one read off the source files.
    """
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
        for i, name in enumerate(names[: bands.shape[0]], start=1):
            dst.set_band_description(i, name)
        dst.update_tags(GAC_GEOREFERENCE=str(meta.get("georeference", "file")))
    return path


def export_geotiff(store_root: str | Path, patch_id: str, path: str | Path, key: str = "opt") -> Path:
    """Write one tile of a store (opt_v1/v2/v3) as a 12-band GeoTIFF with the tile's CRS and transform."""
    store = ShardStore(store_root)
    rows = store.rows_for([patch_id])
    return write_geotiff(path, store.read(key, rows)[0], rows.iloc[0])


def export_geotiffs(store_root: str | Path, folder: str | Path, suffix: str, key: str = "opt") -> int:
    """Write every tile of a store as ``<folder>/<patch_id><suffix>.tif`` with its tile's CRS and transform; return
    how many.

    ``folder`` is replaced as a whole (atomically): it holds exactly the store's tiles, never a file left from a run
    on other tiles. Shard by shard, from the memory-mapped arrays, so the cost grows with the tiles, not their square.
    """
    store = ShardStore(store_root)
    index = store.index
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for shard, rows in index.groupby("shard", sort=True):
            bands = store.array(shard, key)
            for _, meta in rows.iterrows():
                write_geotiff(tmp / f"{meta['patch_id']}{suffix}.tif", np.asarray(bands[meta["row"]]), meta)
    return len(index)
