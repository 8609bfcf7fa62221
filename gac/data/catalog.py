"""The tile catalog: BigEarthNet v2 GeoTIFFs → validated, resampled, packed shards that every later stage reads.

Pairing comes from ``metadata.parquet`` (``patch_id`` ↔ ``s1_name``), never from guessing names. Each tile is read
from the BigEarthNet v2 layout (:mod:`gac.data.layout`), validated and stored in a :class:`~gac.store.ShardStore`:

* ``s2``: ``(12, 120, 120) uint16`` L2A DN in :data:`~gac.data.layout.S2_BANDS` order. 20 m and 60 m bands are
  resampled to the 10 m grid on read with GDAL's *bilinear* resampling (``rasterio`` ``out_shape``), the same call
  torchgeo's ``BigEarthNetV2`` makes, so the two readers agree pixel for pixel.
* ``s1``: ``(2, 120, 120) float32`` σ0 in dB, ``[VV, VH]`` (TerraMind's order; torchgeo returns ``[VH, VV]`` read
  as int32, which GDAL rounds half away from zero: up to 0.5 dB off).

A tile is rejected, with a one-line reason, when a file is missing or unreadable, a band has the wrong shape, dtype or
count, S1 holds NaN/inf, an S2 band is all nodata (0), or S1 and S2 disagree on CRS or bounds. The stage goes on past
rejected tiles and lists them in ``rejected.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gac.atomic import write_text
from gac.config import CatalogParams
from gac.data import layout
from gac.errors import GacError
from gac.store import ShardStore

#: Season of a northern-hemisphere acquisition month (BigEarthNet covers Europe only).
SEASONS = {
    12: "winter",
    1: "winter",
    2: "winter",
    3: "spring",
    4: "spring",
    5: "spring",
    6: "summer",
    7: "summer",
    8: "summer",
    9: "autumn",
    10: "autumn",
    11: "autumn",
}
#: Bounds of S1 and S2 may differ by at most this many metres (half a 10 m pixel).
BOUNDS_TOLERANCE_M = 5.0
CONFIG_FILE = "catalog.json"


class TileError(Exception):
    """A tile that cannot be used; the message is the one-line reason recorded in ``rejected.parquet``."""


@dataclass(frozen=True)
class Tile:
    """One validated tile as the catalog stores it."""

    s2: np.ndarray  # (12, 120, 120) uint16
    s1: np.ndarray  # (2, 120, 120) float32
    crs: str
    transform: tuple[float, ...]
    georeference: str


def _read_band(path: Path, expected_px: int, dtype: str) -> tuple[np.ndarray, object, tuple, object]:
    """Read one single-band GeoTIFF at its native size, validate it and resample it to the 120 px grid."""
    import rasterio
    from rasterio.enums import Resampling

    if not path.is_file():
        raise TileError(f"{path}: missing band file (expected a {expected_px}x{expected_px} {dtype} GeoTIFF)")
    try:
        with rasterio.open(path) as src:
            if src.count != 1:
                raise TileError(f"{path}: {src.count} bands (expected 1)")
            if (src.height, src.width) != (expected_px, expected_px):
                raise TileError(f"{path}: shape {src.height}x{src.width} (expected {expected_px}x{expected_px})")
            if src.dtypes[0] != dtype:
                raise TileError(f"{path}: dtype {src.dtypes[0]} (expected {dtype})")
            size = layout.TILE_SIZE
            data = src.read(1, out_shape=(size, size), resampling=Resampling.bilinear)
            georef = src.tags().get("GAC_GEOREFERENCE", "file")
            return data, src.crs, tuple(src.bounds), georef
    except TileError:
        raise
    except Exception as e:  # rasterio raises several types for corrupt files; all mean the same here.
        raise TileError(f"{path}: unreadable GeoTIFF ({type(e).__name__}: {str(e).splitlines()[0]})") from None


#: ``data.exclude`` names → the reBEN metadata column that flags them.
FLAG_COLUMNS = {"cloud_or_shadow": "contains_cloud_or_shadow", "seasonal_snow": "contains_seasonal_snow"}


def flagged(index: pd.DataFrame, exclude: Sequence[str]) -> dict[str, pd.Series]:
    """``{flag: boolean mask}`` of the rows of a catalog index each flag of ``exclude`` removes (``data.exclude``)."""
    masks = {}
    for flag in exclude:
        column = FLAG_COLUMNS[flag]
        if column not in index:
            raise GacError(f"data.exclude: the catalog has no '{column}' column to filter '{flag}' on; rebuild it")
        masks[flag] = index[column].fillna(False).astype(bool)
    return masks


def keep_unflagged(index: pd.DataFrame, exclude: Sequence[str]) -> pd.DataFrame:
    """``index`` without the rows any flag of ``exclude`` marks."""
    drop = np.zeros(len(index), dtype=bool)
    for mask in flagged(index, exclude).values():
        drop |= mask.to_numpy()
    return index[~drop]


def read_tile(root: str | Path, patch_id: str, s1_name: str) -> Tile:
    """Read, validate and resample one tile pair; raise :class:`TileError` with the reason when it is unusable."""
    s2 = np.empty((len(layout.S2_BANDS), layout.TILE_SIZE, layout.TILE_SIZE), dtype=np.uint16)
    crs = bounds = None
    georef = "file"
    for i, band in enumerate(layout.S2_BANDS):
        px = layout.TILE_SIZE * 10 // layout.S2_GSD[band]
        path = layout.s2_band_path(root, patch_id, band)
        s2[i], band_crs, band_bounds, georef = _read_band(path, px, "uint16")
        if not s2[i].any():
            raise TileError(f"{path}: all pixels are nodata (0)")
        if crs is None:
            crs, bounds = band_crs, band_bounds
        elif band_crs != crs or not np.allclose(band_bounds, bounds, atol=BOUNDS_TOLERANCE_M):
            raise TileError(f"{path}: CRS/bounds differ from the patch's B01")
    s1 = np.empty((len(layout.S1_BANDS), layout.TILE_SIZE, layout.TILE_SIZE), dtype=np.float32)
    for i, band in enumerate(layout.S1_BANDS):
        path = layout.s1_band_path(root, s1_name, band)
        s1[i], s1_crs, s1_bounds, _ = _read_band(path, layout.TILE_SIZE, "float32")
        if not np.isfinite(s1[i]).all():
            raise TileError(f"{path}: {int((~np.isfinite(s1[i])).sum())} NaN/inf pixels (expected finite dB)")
        if s1_crs != crs:
            raise TileError(f"{path}: CRS {s1_crs} differs from its S2 patch's {crs}")
        if not np.allclose(s1_bounds, bounds, atol=BOUNDS_TOLERANCE_M):
            raise TileError(f"{path}: bounds {s1_bounds} differ from its S2 patch's {bounds}")
    import rasterio.transform

    transform = rasterio.transform.from_bounds(*bounds, layout.TILE_SIZE, layout.TILE_SIZE)
    return Tile(s2=s2, s1=s1, crs=crs.to_string(), transform=tuple(transform)[:6], georeference=georef)


def read_metadata(root: str | Path) -> pd.DataFrame:
    """Load and check ``metadata.parquet`` (one clear line if it is missing or lacks a column)."""
    path = Path(root, layout.METADATA_FILE)
    if not path.is_file():
        raise GacError(f"{path}: not found (expected BigEarthNet v2's metadata.parquet; set data.root in params.yaml)")
    meta = pd.read_parquet(path)
    missing = [c for c in layout.METADATA_COLUMNS if c not in meta.columns]
    if missing:
        raise GacError(f"{path}: missing column(s) {missing} (expected {list(layout.METADATA_COLUMNS)})")
    return meta


def select(meta: pd.DataFrame, splits: Sequence[str], max_tiles: int | None) -> pd.DataFrame:
    """Tiles of ``splits`` in metadata order, at most ``max_tiles`` (the first ones: deterministic)."""
    rows = meta[meta["split"].isin(list(splits))]
    return (rows if max_tiles is None else rows.head(max_tiles)).reset_index(drop=True)


def _acquisition(patch_id: str) -> tuple[str, str]:
    """Acquisition date (``YYYY-MM-DD``) and season from an S2 product-style patch id."""
    stamp = patch_id.split("_")[2]
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}", SEASONS[int(stamp[4:6])]


def _build_shard(args: tuple[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, np.ndarray], pd.DataFrame]:
    """Read one shard's tiles (runs in a worker process)."""
    root, rows = args
    kept, s2s, s1s, rejected = [], [], [], []
    for rec in rows.to_dict("records"):
        try:
            tile = read_tile(root, rec["patch_id"], rec["s1_name"])
        except TileError as e:
            rejected.append({"patch_id": rec["patch_id"], "reason": str(e)})
            continue
        date, season = _acquisition(rec["patch_id"])
        kept.append(
            {
                "patch_id": rec["patch_id"],
                "s1_name": rec["s1_name"],
                "split": rec["split"],
                "country": rec["country"],
                "labels": list(rec["labels"]),
                "date": date,
                "season": season,
                "crs": tile.crs,
                "transform": list(tile.transform),
                "georeference": tile.georeference,
                "contains_seasonal_snow": bool(rec["contains_seasonal_snow"]),
                "contains_cloud_or_shadow": bool(rec["contains_cloud_or_shadow"]),
            }
        )
        s2s.append(tile.s2)
        s1s.append(tile.s1)
    size = layout.TILE_SIZE
    arrays = {
        "s2": np.stack(s2s) if s2s else np.empty((0, len(layout.S2_BANDS), size, size), np.uint16),
        "s1": np.stack(s1s) if s1s else np.empty((0, len(layout.S1_BANDS), size, size), np.float32),
    }
    return pd.DataFrame(kept), arrays, pd.DataFrame(rejected, columns=["patch_id", "reason"])


def fingerprint(params: CatalogParams, root: str | Path, selected: pd.DataFrame) -> str:
    """What makes a catalog: if it changes, shards from an earlier run are stale and are rebuilt.

    The data root enters by *content* (the sha256 of its ``metadata.parquet``), never by path: the same data in
    another folder — a fresh clone, a moved disk — gives the same catalog, byte for byte, and so the same DVC hash.
    """
    digest = hashlib.sha256()
    with Path(root, layout.METADATA_FILE).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    key = {"metadata": digest.hexdigest(), "shard_size": params.shard_size, "ids": list(selected["patch_id"])}
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


@dataclass(frozen=True)
class CatalogReport:
    """What a catalog run did."""

    tiles: int
    rejected: pd.DataFrame
    seconds: float

    def summary(self) -> dict:
        return {
            "tiles": self.tiles,
            "rejected": len(self.rejected),
            "seconds": round(self.seconds, 3),
            "tiles_per_s": round((self.tiles + len(self.rejected)) / max(self.seconds, 1e-9), 2),
        }


def build(params: CatalogParams, root: str | Path, progress: bool = True) -> CatalogReport:
    """Build (or resume) the catalog of ``root`` into ``params.out``; shards already written are kept."""
    import shutil

    from tqdm import tqdm

    start = time.perf_counter()
    selected = select(read_metadata(root), params.splits, params.max_tiles)
    if selected.empty:
        raise GacError(f"{root}: no tiles in splits {params.splits} (check catalog.splits in params.yaml)")
    out = Path(params.out)
    stamp = fingerprint(params, root, selected)
    config = out / CONFIG_FILE
    if out.exists() and not config.is_file() and any(out.iterdir()):
        # Never delete a folder this stage did not write (e.g. --output-dir pointing at the data root).
        raise GacError(f"{out}: exists and is not a catalog (no {CONFIG_FILE}); remove it or set catalog.out")
    if out.exists() and (not config.is_file() or json.loads(config.read_text()).get("fingerprint") != stamp):
        shutil.rmtree(out)  # written for other tiles or settings: nothing to resume from.
    out.mkdir(parents=True, exist_ok=True)
    write_text(config, json.dumps({"fingerprint": stamp, "root": str(root), "splits": list(params.splits)}))
    store = ShardStore(out)
    store.clean_partial()
    done = set(store.shard_names())
    jobs = [
        (f"{i // params.shard_size:05d}", selected.iloc[i : i + params.shard_size])
        for i in range(0, len(selected), params.shard_size)
    ]
    todo = [(name, rows) for name, rows in jobs if name not in done]
    bar = tqdm(
        total=len(selected),
        initial=len(selected) - sum(len(r) for _, r in todo),
        unit="tile",
        desc="catalog",
        disable=not progress,
    )
    work = [(str(root), rows) for _, rows in todo]
    if params.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(params.workers) as pool:
            results = pool.map(_build_shard, work)
            for (name, rows), (index, arrays, rejected) in zip(todo, results, strict=True):
                store.write_shard(name, index, arrays, rejected)
                bar.update(len(rows))
    else:
        for (name, rows), args in zip(todo, work, strict=True):
            store.write_shard(name, *_build_shard(args))
            bar.update(len(rows))
    bar.close()
    index = store.finalize()
    rejected = store.rejected()
    return CatalogReport(tiles=len(index), rejected=rejected, seconds=time.perf_counter() - start)
