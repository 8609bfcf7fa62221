"""The tile catalog: BigEarthNet v2 GeoTIFFs → validated, resampled, packed shards that every later stage reads.

Pairing comes from ``metadata.parquet`` (``patch_id`` ↔ ``s1_name``), never from guessing names. Each tile is read
from the BigEarthNet v2 layout (:mod:`gac.data.layout`), validated and stored in a :class:`~gac.io.store.ShardStore`:

* ``s2``: ``(12, 120, 120) uint16`` L2A DN in :data:`~gac.sensors.S2_BANDS` order. 20 m and 60 m bands are
  resampled to the 10 m grid on read with GDAL's *bilinear* resampling (``rasterio`` ``out_shape``), the same call
  torchgeo's ``BigEarthNetV2`` makes, so the two readers agree pixel for pixel.
* ``s1``: ``(2, 120, 120) float32`` σ0 in dB, ``[VV, VH]`` (TerraMind's order; torchgeo returns ``[VH, VV]`` read
  as int32, which GDAL rounds half away from zero: up to 0.5 dB off).

The metadata is checked first (:mod:`gac.data.metadata`): duplicate ids refuse the root, a bad row is rejected
with its reason like a broken tile, missing optional columns are defaulted.

A tile is rejected, with a one-line reason, when a file is missing or unreadable, holds more than one band, S2 is not
integer DN within uint16 or S1 not real-valued, a band has no CRS, S1 holds NaN/inf, an S2 band is all nodata (0), the
tile does not cover 1200 m × 1200 m, or its bands, S1 and S2 disagree on CRS or bounds. A band of any size is accepted
and resampled to the 10 m grid (datasets resampled to 10 m, such as torchgeo's test data, store all bands at 120 px).
The stage goes on past rejected tiles and lists them in ``rejected.parquet`` (per shard and, merged, at the root),
each with its ``split``, so every command that builds a catalog on its way can count them in its summary
(:func:`rejected_note`). A patch id whose acquisition date cannot be read is no reason to reject a tile: it is
kept with season ``unknown`` (:func:`gac.data.metadata.acquisition`), and :attr:`CatalogReport.notes` says how many.

Each shard keeps the digest of the files it was read from (:func:`_sources_digest`): a rerun rebuilds the shards whose
files changed and keeps the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from gac.config import CatalogParams
from gac.data import layout, metadata
from gac.errors import GacError
from gac.io import fingerprint as fingerprints
from gac.io.atomic import write_text
from gac.io.lock import exclusive
from gac.io.store import REJECTED, ShardStore

#: Bounds of S1 and S2 may differ by at most this many metres (half a 10 m pixel); compared with ``rtol=0``, since
#: ``np.allclose``'s default relative tolerance alone would let a band 50 m off pass at UTM northings (~5e6 m).
BOUNDS_TOLERANCE_M = 5.0
#: Width and height of a tile on the ground: 120 px at 10 m.
TILE_EXTENT_M = layout.TILE_SIZE * 10.0
CONFIG_FILE = "catalog.json"
#: Kept in each shard: the digest of the source files its tiles were read from (see :func:`_sources_digest`).
SOURCES_FILE = "sources.sha256"


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


#: What a band file holds as read: its bytes, ``None`` when it is missing, or the error that stopped reading it.
Blob = bytes | OSError | None


def _read_files(paths: Sequence[Path]) -> dict[Path, Blob]:
    """Each file's bytes, in ``paths`` order (see :func:`_build_shard` for why bytes and not paths)."""
    blobs: dict[Path, Blob] = {}
    for path in paths:
        try:
            blobs[path] = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            blobs[path] = None
        except OSError as e:
            blobs[path] = e
    return blobs


def _read_band(path: Path, blob: Blob, sensor: str) -> tuple[np.ndarray, object, tuple, str]:
    """Decode one single-band GeoTIFF, validate it and resample it to the 120 px grid.

    Any band size is accepted (datasets resampled to 10 m store every band at 120 px; torchgeo reads them the same
    way): the bounds, checked by the caller against the tile's, say where the pixels are, and GDAL's bilinear
    ``out_shape`` read puts them on the 10 m grid. S2 must be integer DN in uint16's range (torchgeo's own test data
    writes int16); S1 any real dtype, returned as float32 dB.
    """
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile

    if blob is None:
        raise TileError(f"{path}: missing band file (expected a single-band GeoTIFF)")
    if isinstance(blob, OSError):
        raise TileError(f"{path}: unreadable file ({type(blob).__name__}: {blob.strerror or blob})")
    mem = MemoryFile(blob)
    try:
        with mem, mem.open() as src:
            dtype = np.dtype(src.dtypes[0])
            if src.count != 1:
                raise TileError(f"{path}: {src.count} bands (expected 1)")
            if sensor == "s2" and dtype.kind not in "ui":
                raise TileError(f"{path}: dtype {dtype} (expected integer DN, e.g. uint16)")
            if sensor == "s1" and dtype.kind not in "uif":
                raise TileError(f"{path}: dtype {dtype} (expected real σ0 in dB, e.g. float32)")
            if src.crs is None:
                raise TileError(f"{path}: no CRS (expected a georeferenced GeoTIFF)")
            size = layout.TILE_SIZE
            data = src.read(1, out_shape=(size, size), resampling=Resampling.bilinear)
            georef = src.tags().get("GAC_GEOREFERENCE", "file")
            crs, bounds = src.crs, tuple(src.bounds)
    except TileError:
        raise
    except Exception as e:  # rasterio raises several types for corrupt files; all mean the same here.
        # GDAL names the in-memory copy (a random /vsimem/ name): name the file instead, so reasons are reproducible.
        message = str(e).splitlines()[0].replace(mem.name, str(path)).replace(Path(mem.name).name, path.name)
        raise TileError(f"{path}: unreadable GeoTIFF ({type(e).__name__}: {message})") from None
    if sensor == "s1":
        return data.astype(np.float32), crs, bounds, georef
    if data.size and (data.min() < 0 or data.max() > np.iinfo(np.uint16).max):
        raise TileError(f"{path}: DN from {data.min()} to {data.max()} (expected 0 to 65535)")
    return data.astype(np.uint16), crs, bounds, georef


def tile_files(root: str | Path, patch_id: str, s1_name: str) -> list[Path]:
    """The files a tile is read from: its 12 S2 bands, then its 2 S1 polarisations (the reference map is not read)."""
    s2 = [layout.s2_band_path(root, patch_id, band) for band in layout.S2_BANDS]
    return s2 + [layout.s1_band_path(root, s1_name, band) for band in layout.S1_BANDS]


def read_tile(root: str | Path, patch_id: str, s1_name: str, blobs: dict[Path, Blob] | None = None) -> Tile:
    """Read, validate and resample one tile pair; raise :class:`TileError` with the reason when it is unusable.

    ``blobs`` are the tile's files as :func:`_read_files` read them (read here when not given).
    """
    import rasterio.transform

    paths = tile_files(root, patch_id, s1_name)
    blobs = _read_files(paths) if blobs is None else blobs
    n_s2 = len(layout.S2_BANDS)
    s2 = np.empty((n_s2, layout.TILE_SIZE, layout.TILE_SIZE), dtype=np.uint16)
    crs = bounds = None
    georef = "file"
    for i, path in enumerate(paths[:n_s2]):
        s2[i], band_crs, band_bounds, georef = _read_band(path, blobs[path], "s2")
        if not s2[i].any():
            raise TileError(f"{path}: all pixels are nodata (0)")
        if crs is None:
            crs, bounds = band_crs, band_bounds
            extent = (bounds[2] - bounds[0], bounds[3] - bounds[1])
            if not np.allclose(extent, TILE_EXTENT_M, atol=BOUNDS_TOLERANCE_M, rtol=0):
                raise TileError(
                    f"{path}: covers {extent[0]:g} x {extent[1]:g} CRS units "
                    f"(expected {TILE_EXTENT_M:g} x {TILE_EXTENT_M:g} m: 120 px at 10 m)"
                )
        elif band_crs != crs or not np.allclose(band_bounds, bounds, atol=BOUNDS_TOLERANCE_M, rtol=0):
            raise TileError(f"{path}: CRS/bounds {band_bounds} differ from the patch's B01 {bounds}")
    s1 = np.empty((len(layout.S1_BANDS), layout.TILE_SIZE, layout.TILE_SIZE), dtype=np.float32)
    for i, path in enumerate(paths[n_s2:]):
        s1[i], s1_crs, s1_bounds, _ = _read_band(path, blobs[path], "s1")
        if not np.isfinite(s1[i]).all():
            raise TileError(f"{path}: {int((~np.isfinite(s1[i])).sum())} NaN/inf pixels (expected finite dB)")
        if s1_crs != crs:
            raise TileError(f"{path}: CRS {s1_crs} differs from its S2 patch's {crs}")
        if not np.allclose(s1_bounds, bounds, atol=BOUNDS_TOLERANCE_M, rtol=0):
            raise TileError(f"{path}: bounds {s1_bounds} differ from its S2 patch's {bounds}")
    transform = rasterio.transform.from_bounds(*bounds, layout.TILE_SIZE, layout.TILE_SIZE)
    return Tile(s2=s2, s1=s1, crs=crs.to_string(), transform=tuple(transform)[:6], georeference=georef)


def _sources_digest(root: str | Path, rows: pd.DataFrame) -> str:
    """sha256 over the path (relative to ``root``) and content of every file the shard's tiles are read from.

    Stored with the shard (:data:`SOURCES_FILE`), so a rerun rebuilds exactly the shards whose input files changed
    (a repaired tile is read again, a newly damaged one rejected) without mtimes, which differ on every fresh clone,
    ever entering the output folder: the same data gives the same catalog bytes anywhere. Cost: one read and hash of
    every source byte (BigEarthNet v2: ≈ 215 KB a tile, about 118 GB for 549,488 tiles; sha256 runs at ≈ 1.2 GB/s per
    core here, so reading the disk dominates) on every rerun, against ≈ 2.7 core-hours of GeoTIFF decoding for a
    rebuild (on the sample: 0.13 s to confirm 21 unchanged tiles, 1.3 s to build them) — unless :class:`StatCache`
    confirms the shard's files by their stat alone.
    """
    h = hashlib.sha256()
    for patch_id, s1_name, problem in zip(rows["patch_id"], rows["s1_name"], rows["problem"], strict=True):
        if not problem:  # a row rejected from its metadata alone has no files; the catalog's fingerprint covers it
            _hash_files(h, root, _read_files(tile_files(root, patch_id, s1_name)))
    return h.hexdigest()


def _stat_digest(root: str | Path, rows: pd.DataFrame) -> str:
    """sha256 over the path, size, mtime and inode of every file a shard's tiles are read from: cheap (no file is
    opened), and only ever compared on this machine (:class:`StatCache`)."""
    h = hashlib.sha256()
    for patch_id, s1_name, problem in zip(rows["patch_id"], rows["s1_name"], rows["problem"], strict=True):
        for path in [] if problem else tile_files(root, patch_id, s1_name):
            try:
                st = path.stat()
                state = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
            except OSError as e:
                state = type(e).__name__
            h.update(f"{path}\t{state}\n".encode())
    return h.hexdigest()


class StatCache:
    """Which shards' source files were confirmed unchanged, keyed by their stat, kept *beside* the catalog folder.

    Why beside and not inside: stats (mtimes, inodes) differ on every clone and machine, and the catalog folder is a
    DVC output whose bytes must not. Why at all: confirming a shard by content (:func:`_sources_digest`) reads every
    source byte again (≈ 118 GB for BigEarthNet v2); a shard whose files have the stat they had when their content
    digest was last confirmed is skipped without opening a file (14 ``stat`` calls a tile). Losing the file only
    costs one rehash.
    """

    def __init__(self, out: str | Path) -> None:
        out = Path(out).absolute()
        self.path = out.parent / f".{out.name}.stat-cache.json"
        try:
            self.entries: dict[str, list[str]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def confirms(self, shard: str, sources: str | None, stat: str) -> bool:
        """Whether the shard on disk (its stored ``sources`` digest) was read from files that still have ``stat``."""
        return sources is not None and self.entries.get(shard) == [sources, stat]

    def confirm(self, shard: str, sources: str, stat: str) -> None:
        self.entries[shard] = [sources, stat]

    def save(self) -> None:
        write_text(self.path, json.dumps(self.entries))


def _hash_files(h: hashlib._Hash, root: str | Path, blobs: dict[Path, Blob]) -> None:
    """Add each file's path and sha256 (or why it could not be read) to the shard's sources digest ``h``."""
    for path, blob in blobs.items():
        state = hashlib.sha256(blob).hexdigest() if isinstance(blob, bytes) else type(blob).__name__
        h.update(f"{path.relative_to(root).as_posix()}\t{state}\n".encode())


def _build_shard(
    args: tuple[str, pd.DataFrame, str | None],
) -> tuple[pd.DataFrame, dict[str, np.ndarray], pd.DataFrame, str] | None:
    """Read one shard's tiles (runs in a worker process); ``None`` when the shard on disk was read from the very same
    files (``args[2]``, its stored sources digest) and can stay.

    Each tile's files are read once, hashed into the new sources digest and decoded from those bytes, so the digest
    describes exactly the pixels stored (a file replaced in between cannot slip through).
    """
    root, rows, kept_digest = args
    if kept_digest is not None and _sources_digest(root, rows) == kept_digest:
        return None
    kept, s2s, s1s, rejected, sources = [], [], [], [], hashlib.sha256()
    for rec in rows.to_dict("records"):
        # The split goes with each rejection, so a summary of one split can count its own (a bad row's may be null)
        split = rec["split"] if isinstance(rec["split"], str) else None
        if rec["problem"]:
            rejected.append({"patch_id": rec["patch_id"], "reason": rec["problem"], "split": split})
            continue
        files = _read_files(tile_files(root, rec["patch_id"], rec["s1_name"]))
        _hash_files(sources, root, files)
        try:
            tile = read_tile(root, rec["patch_id"], rec["s1_name"], files)
        except TileError as e:
            rejected.append({"patch_id": rec["patch_id"], "reason": str(e), "split": split})
            continue
        date, season = metadata.acquisition(rec["patch_id"])
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
    rejected_rows = pd.DataFrame(rejected, columns=["patch_id", "reason", "split"])
    return pd.DataFrame(kept), arrays, rejected_rows, sources.hexdigest()


def fingerprint(params: CatalogParams, root: str | Path, selected: pd.DataFrame) -> str:
    """What makes a catalog: if it changes, shards from an earlier run are stale and are rebuilt.

    The data root enters by *content* (the sha256 of its ``metadata.parquet``), never by path: the same data in
    another folder — a fresh clone, a moved disk — gives the same catalog, byte for byte, and so the same DVC hash.
    The tiles' files enter per shard (:func:`_sources_digest`), so a changed file costs one shard, not the catalog.
    """
    key = {"metadata": fingerprints.file_digest(Path(root, layout.METADATA_FILE)), "shard_size": params.shard_size,
           "ids": list(selected["patch_id"])}  # fmt: skip
    return fingerprints.record_digest(key)


@dataclass(frozen=True)
class CatalogReport:
    """What a catalog run did."""

    tiles: int
    rejected: pd.DataFrame
    seconds: float
    #: Lines to show once for the whole root (e.g. which optional metadata columns were defaulted).
    notes: tuple[str, ...] = ()
    #: Shards (re)written by this run and shards kept because their source files had not changed.
    shards_written: int = 0
    shards_kept: int = 0
    #: Tiles kept with season ``unknown``: their patch id carries no readable acquisition date.
    unknown_season: int = 0

    def summary(self) -> dict:
        return {
            "tiles": self.tiles,
            "rejected": len(self.rejected),
            "seconds": round(self.seconds, 3),
            "tiles_per_s": round((self.tiles + len(self.rejected)) / max(self.seconds, 1e-9), 2),
        }


def build(params: CatalogParams, root: str | Path, progress: bool = True) -> CatalogReport:
    """Build (or resume) the catalog of ``root`` into ``params.out``.

    The metadata is checked before any tile is read (:mod:`gac.data.metadata`): duplicate ids refuse the whole root,
    a bad row is rejected with its reason. Shards already written are kept when the files they were read from are
    unchanged (:func:`_sources_digest`, :class:`StatCache`) and rebuilt otherwise.
    """
    import shutil

    start = time.perf_counter()
    path = Path(root, layout.METADATA_FILE)
    meta, notes = metadata.with_defaults(metadata.read_metadata(root), path)
    metadata.refuse_duplicates(meta, path)
    meta["problem"] = [
        # "" rather than None: a null would read back as NaN
        "" if (why := metadata.row_problem(*names)) is None else f"{path} row {i}: {why}"
        for i, names in enumerate(zip(meta["patch_id"], meta["s1_name"], meta["split"], strict=True))
    ]  # zip, not to_dict("records"): 0.8 s instead of 7 s for 550k rows
    selected = metadata.select(meta, params.splits, params.max_tiles)
    if selected.empty:
        raise GacError(f"{root}: no tiles in splits {params.splits} (check catalog.splits in params.yaml)")
    out = Path(params.out)
    with exclusive(out):  # two catalog runs on one folder would mix their shards
        report = _write(params, root, selected, out, progress)
        if not report.tiles:  # nothing usable: keep no "finished" catalog for a rerun or the next stage to trust
            shutil.rmtree(out, ignore_errors=True)
            first = report.rejected.iloc[0]
            raise GacError(f"{root}: all {len(report.rejected)} tiles rejected, no catalog written "
                           f"(first: {first['patch_id']}: {first['reason']})")  # fmt: skip
    if report.unknown_season:
        notes.append(unknown_season_note(out, report.unknown_season))
    return replace(report, seconds=time.perf_counter() - start, notes=tuple(notes))


def unknown_season_note(out: str | Path, count: int) -> str:
    """The one note a catalog run prints about the tiles it kept with season ``unknown``: how many, and an example."""
    index = ShardStore(out).index
    example = index.loc[index["season"] == metadata.UNKNOWN_SEASON, "patch_id"].iloc[0]
    try:
        layout.acquisition_date(example)
        why = ""
    except ValueError as e:
        why = ": " + str(e).removeprefix("no acquisition date (").removesuffix(")")
    return (f"{count} tile(s) kept with season '{metadata.UNKNOWN_SEASON}': their patch_id has no readable acquisition "
            f"date (e.g. {example}{why}); the date only groups results by season")  # fmt: skip


def rejected_note(rejected: int, catalog_root: str | Path) -> str:
    """``"2 rejected: see <catalog>/rejected.parquet"``: what every command's summary line says about the tiles its
    catalog rejected (``""`` when there are none)."""
    return f"{rejected} rejected: see {Path(catalog_root) / REJECTED}" if rejected else ""


def rejected_in(rejected: pd.DataFrame, splits: Sequence[str] | None = None) -> int:
    """How many rows of a catalog's ``rejected.parquet`` belong to ``splits`` (all of them for ``None``, or for a
    catalog written before rejections carried their split)."""
    if splits is None or "split" not in rejected:
        return len(rejected)
    return int(rejected["split"].isin(list(splits)).sum())


def _write(params: CatalogParams, root: str | Path, selected: pd.DataFrame, out: Path, progress: bool) -> CatalogReport:
    """:func:`build`'s writing part, under the output folder's lock."""
    import shutil

    from tqdm import tqdm

    stamp = fingerprint(params, root, selected)
    config = out / CONFIG_FILE
    if out.exists() and not config.is_file() and any(out.iterdir()):
        # Never delete a folder this stage did not write (e.g. --output-dir pointing at the data root).
        raise GacError(f"{out}: exists and is not a catalog (no {CONFIG_FILE}); remove it or set catalog.out")
    if out.exists() and (fingerprints.read(config) or {}).get("fingerprint") != stamp:
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
    # Every shard on disk is checked: skipped when its files' stat is the one its sources were last confirmed with,
    # else hashed, and rebuilt when the content changed. Stats are taken before any file is read (a file replaced
    # between its stat and its read makes the next run hash it again, never trust it).
    stat_cache = StatCache(out)
    kept = {name: store.shard_text(name, SOURCES_FILE) for name, _ in jobs if name in done}
    stats = {name: _stat_digest(root, rows) for name, rows in jobs}
    todo = [(name, rows) for name, rows in jobs if not stat_cache.confirms(name, kept.get(name), stats[name])]
    work = [(str(root), rows, kept.get(name)) for name, rows in todo]
    # The bar is closed on any exit, so an error prints on a line of its own.
    bar = tqdm(total=len(selected), initial=len(selected) - sum(len(r) for _, r in todo), unit="tile",
               desc="catalog", disable=not progress)  # fmt: skip
    written = 0
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        stack.callback(stat_cache.save)  # what was confirmed so far, also when a later shard fails
        parallel = params.workers > 1 and len(todo) > 1
        pool = stack.enter_context(ProcessPoolExecutor(params.workers)) if parallel else None
        for (name, rows), result in zip(todo, (pool.map if pool else map)(_build_shard, work), strict=True):
            if result is not None:
                index, arrays, rejected, digest = result
                store.write_shard(name, index, arrays, rejected, texts={SOURCES_FILE: digest})
                kept[name] = digest
                written += 1
            stat_cache.confirm(name, kept[name], stats[name])
            bar.update(len(rows))
    index = store.finalize()
    unknown = int((index["season"] == metadata.UNKNOWN_SEASON).sum()) if "season" in index else 0
    return CatalogReport(
        unknown_season=unknown,
        tiles=len(index),
        rejected=store.rejected(),
        seconds=0.0,
        shards_written=written,
        shards_kept=len(jobs) - written,
    )
