"""Materialise the small sample of REAL BigEarthNet v2 (reBEN) patches that ships inside the ``configilm`` wheel.

Why this source: the full BigEarthNet v2 archive is ~100 GB, but ``configilm==0.7.1`` (the reBEN authors' own library)
embeds 24 genuine reBEN patches as test data: an LMDB at ``configilm/extra/mock_data/BENv2/BigEarthNet-V2-LMDB`` and
two real metadata files beside it (``metadata.parquet``: 18 rows, 6 per split; and
``metadata_for_patches_with_snow_cloud_or_shadow.parquet``: 6 rows whose snow/cloud flags are set). That is enough to
run every stage of GAC end to end on real Sentinel-1/Sentinel-2 pixels without the full download. The wheel is fetched
with ``pip download`` into a cache, verified against a pinned sha256 and read with :mod:`zipfile`; configilm is never
installed or imported.

What the LMDB holds (explored, not documented upstream): 48 entries, one per S2 patch and one per S1 patch. The key is
the plain patch name (``patch_id`` for S2, ``s1_name`` for S1, UTF-8); the value is a safetensors blob whose tensor
names are the band names: S2 ``B01``…``B12`` + ``B8A`` as uint16 at native resolution (120/60/20 px for 10/20/60 m),
S1 ``VV`` and ``VH`` as float32 backscatter in dB, 120×120. Written patches are the metadata rows (both files) whose
S2 and S1 entries are both in the LMDB with all bands at the expected shape; the snow/cloud rows are kept because
their flags are real and the columns say so, so a consumer can filter them.

RECONSTRUCTED georeference: the LMDB carries pixels only, no CRS or transform. For tile T33UUP (21 patches, Austria,
2017-06) it is rebuilt from the patch name: EPSG:32633, tile upper-left corner (300000, 5400000), and patch
``..._<X>_<Y>`` (the last two ``_`` parts of ``patch_id``) has its upper-left corner at
``(300000 + 1200·X, 5400000 − 1200·Y)``, with 10/20/60 m pixels over the same 1200 m square. The axis order (X =
column eastwards, Y = row southwards) was checked on the pixels: the last row of ``..._27_55`` continues into the first
row of ``..._27_56`` and the last column of ``..._33_69`` into the first column of ``..._34_69`` (seam differences in
B08 match neighbouring-pixel differences; with the axes swapped they are ~4× larger). The absolute origin is the MGRS
tile corner and cannot be verified from the data. S1 gets the georeference of its paired S2 patch. Every
written GeoTIFF carries the tag ``GAC_GEOREFERENCE=reconstructed:T33UUP-patch-grid`` so nothing downstream mistakes it
for a surveyed one. Patches on tiles whose origin GAC does not know (T35VNJ, Finland, 3 patches) are SKIPPED with a
one-line reason rather than given an invented position.

Reference maps: the wheel contains no CORINE reference maps, so none are written (inventing them would fake labels).
The empty ``Reference_Maps`` folder is still created because torchgeo's ``BigEarthNetV2`` checks that it exists;
torchgeo's ``__getitem__`` also loads the map, so the sample is readable through its image and label loaders only.

Determinism: same bytes on every run (fixed GeoTIFF creation options, no timestamps, no ``.aux.xml`` side files,
sorted iteration, fixed parquet writer settings). Atomicity: the whole tree is built in a ``.tmp-`` folder beside
``root`` and renamed into place, so a killed run leaves either the previous tree or nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gac.data.layout import (
    METADATA_COLUMNS,
    METADATA_FILE,
    REFERENCE_DIR,
    S1_BANDS,
    S1_DIR,
    S2_BANDS,
    S2_DIR,
    S2_GSD,
    TILE_SIZE,
    s1_band_path,
    s2_band_path,
    s2_tile_name,
    write_metadata,
)
from gac.errors import GacError
from gac.io.atomic import atomic_path
from gac.io.fingerprint import file_digest

WHEEL_PROJECT = "configilm"
WHEEL_VERSION = "0.7.1"
WHEEL_FILE = f"{WHEEL_PROJECT}-{WHEEL_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "54e8c2424c55bb4e68dfda07593e155e9ecfa6c60b50585c4b378076934cf5e3"
#: Folder inside the wheel that holds the reBEN sample.
WHEEL_DATA_DIR = "configilm/extra/mock_data/BENv2/"
WHEEL_LMDB_DIR = WHEEL_DATA_DIR + "BigEarthNet-V2-LMDB/"

#: Tag written into every GeoTIFF whose georeference was rebuilt from the patch name.
GEOREFERENCE_TAG = "GAC_GEOREFERENCE"
#: Tag naming where the pixels came from.
SOURCE_TAG = "GAC_SOURCE"
SOURCE_VALUE = f"{WHEEL_PROJECT}=={WHEEL_VERSION}:{WHEEL_DATA_DIR.rstrip('/')}"
#: Parquet schema-metadata key under which the skip reasons are kept, so a reused root can still report them.
SKIPPED_KEY = b"gac:skipped"

#: Tiles whose georeference GAC can rebuild: tile -> (EPSG code, upper-left x, upper-left y) of the patch grid.
TILE_GRIDS: dict[str, tuple[int, float, float]] = {"T33UUP": (32633, 300000.0, 5400000.0)}
#: Side of one patch in metres (120 px × 10 m).
PATCH_METRES = 1200.0

#: GeoTIFF creation options, fixed so the bytes never depend on GDAL defaults changing between calls.
_UINT_OPTIONS = {"compress": "deflate", "zlevel": 6, "predictor": 2, "tiled": False, "interleave": "band"}
_FLOAT_OPTIONS = {"compress": "deflate", "zlevel": 6, "predictor": 3, "tiled": False, "interleave": "band"}


@dataclass
class SampleReport:
    """What :func:`materialise_sample` did.

    Attributes:
        root: The folder holding the BigEarthNet v2 layout.
        written: Patch ids present in ``root/metadata.parquet``, in file order.
        skipped: Patch id -> one-line reason it was left out.
        reused: True when ``root`` already held a finished sample and nothing was written.
    """

    root: Path
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    reused: bool = False


def default_cache_dir() -> Path:
    """Where the wheel is kept between runs: ``$XDG_CACHE_HOME/gac/wheels`` (``~/.cache/gac/wheels``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "gac", "wheels")


def fetch_wheel(cache_dir: str | Path | None = None) -> Path:
    """Return the verified ``configilm`` wheel, downloading it with pip into ``cache_dir`` if it is not there.

    pip is used (not a hand-written HTTP client) so the user's index configuration, proxies and certificates apply.
    ``--no-deps`` keeps configilm's heavy dependencies out; nothing is installed.

    Raises:
        GacError: pip failed, or the file's sha256 is not the pinned one (a tampered or re-released wheel).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_FILE
    if not wheel.is_file():
        # Downloaded beside the cache and renamed into it: a process reading the cache (a second `gac sample`, a test
        # worker) sees the whole wheel or none, never a partial file that would fail the digest check.
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            cmd = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--quiet", f"{WHEEL_PROJECT}=={WHEEL_VERSION}", "-d", tmp,
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0 or not (Path(tmp) / WHEEL_FILE).is_file():
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise GacError(f"could not download {WHEEL_PROJECT}=={WHEEL_VERSION} with pip into {cache}: {last}")
            os.replace(Path(tmp) / WHEEL_FILE, wheel)
    actual = file_digest(wheel)
    if actual != WHEEL_SHA256:
        raise GacError(
            f"{wheel} has sha256 {actual}, expected {WHEEL_SHA256} for {WHEEL_PROJECT}=={WHEEL_VERSION}; "
            "delete it and retry, or check your package index"
        )
    return wheel


def _read_wheel(wheel: Path) -> tuple[dict[str, dict[str, np.ndarray]], list[dict[str, object]]]:
    """Read the LMDB entries and the metadata rows out of the wheel.

    Returns:
        ``{lmdb key: {band: array}}`` and the metadata rows (``metadata.parquet`` first, then the other parquet files
        of the sample folder in name order), each row a dict over :data:`METADATA_COLUMNS`.
    """
    import io

    import lmdb
    import pandas as pd
    from safetensors.numpy import load as load_safetensors

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        lmdb_members = sorted(n for n in names if n.startswith(WHEEL_LMDB_DIR) and not n.endswith("/"))
        parquet_members = sorted(
            (n for n in names if n.startswith(WHEEL_DATA_DIR) and n.endswith(".parquet")),
            key=lambda n: (Path(n).name != METADATA_FILE, n),
        )
        if not lmdb_members or not parquet_members:
            raise GacError(f"{wheel} has no BigEarthNet v2 sample under {WHEEL_DATA_DIR}")
        rows: list[dict[str, object]] = []
        for member in parquet_members:
            frame = pd.read_parquet(io.BytesIO(zf.read(member)))
            missing = [c for c in METADATA_COLUMNS if c not in frame.columns]
            if missing:
                raise GacError(f"{wheel}!{member} lacks metadata columns {missing}")
            for record in frame[list(METADATA_COLUMNS)].to_dict("records"):
                record["labels"] = [str(x) for x in record["labels"]]
                rows.append(record)
        with tempfile.TemporaryDirectory(prefix="gac-reben-lmdb-") as tmp:
            for member in lmdb_members:
                target = Path(tmp, Path(member).name)
                target.write_bytes(zf.read(member))
            entries: dict[str, dict[str, np.ndarray]] = {}
            env = lmdb.open(tmp, readonly=True, lock=False, readahead=False, meminit=False)
            try:
                with env.begin(write=False) as txn:
                    for key, value in txn.cursor():
                        entries[bytes(key).decode()] = dict(load_safetensors(bytes(value)))
            finally:
                env.close()
    return entries, rows


def patch_transform(patch_id: str, gsd: int) -> tuple[int, tuple[float, float, float, float, float, float]]:
    """The reconstructed (EPSG code, affine coefficients a, b, c, d, e, f) of a patch at pixel size ``gsd`` metres.

    Raises:
        GacError: the patch lies on a tile whose grid origin GAC does not know.
    """
    tile = s2_tile_name(patch_id)
    if tile not in TILE_GRIDS:
        raise GacError(f"tile {tile}: UTM origin of its patch grid is unknown, so no honest georeference exists")
    epsg, x0, y0 = TILE_GRIDS[tile]
    col, row = (int(p) for p in patch_id.split("_")[-2:])
    return epsg, (float(gsd), 0.0, x0 + PATCH_METRES * col, 0.0, -float(gsd), y0 - PATCH_METRES * row)


def _check_patch(row: dict[str, object], entries: dict[str, dict[str, np.ndarray]]) -> str | None:
    """Why a metadata row cannot be written, or None when it can."""
    patch_id, s1_name = str(row["patch_id"]), str(row["s1_name"])
    tile = s2_tile_name(patch_id)
    if tile not in TILE_GRIDS:
        return f"tile {tile}: UTM origin of its patch grid is unknown, so no honest georeference exists"
    if patch_id not in entries:
        return "S2 patch is not in the LMDB"
    if s1_name not in entries:
        return f"S1 patch {s1_name} is not in the LMDB"
    for band in S2_BANDS:
        array = entries[patch_id].get(band)
        side = TILE_SIZE * 10 // S2_GSD[band]
        if array is None or array.shape != (side, side) or array.dtype != np.uint16:
            return f"S2 band {band} missing or not uint16 {side}x{side}"
    for band in S1_BANDS:
        array = entries[s1_name].get(band)
        if array is None or array.shape != (TILE_SIZE, TILE_SIZE) or array.dtype != np.float32:
            return f"S1 band {band} missing or not float32 {TILE_SIZE}x{TILE_SIZE}"
    return None


def _write_tif(path: Path, array: np.ndarray, patch_id: str, gsd: int) -> None:
    """Write one single-band GeoTIFF with the reconstructed georeference and the provenance tags."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    epsg, coeffs = patch_transform(patch_id, gsd)
    options = _FLOAT_OPTIONS if array.dtype.kind == "f" else _UINT_OPTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff", "width": array.shape[1], "height": array.shape[0], "count": 1, "dtype": array.dtype.name,
        "crs": CRS.from_epsg(epsg), "transform": Affine(*coeffs), **options,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.update_tags(
            **{GEOREFERENCE_TAG: f"reconstructed:{s2_tile_name(patch_id)}-patch-grid", SOURCE_TAG: SOURCE_VALUE}
        )
        dst.write(array, 1)


def _write_metadata(path: Path, rows: list[dict[str, object]], skipped: dict[str, str]) -> None:
    """Write the metadata rows and, in the schema metadata, the skip reasons."""
    write_metadata(path, rows, {SKIPPED_KEY: json.dumps(skipped, sort_keys=True).encode()})


def _read_existing(root: Path) -> SampleReport:
    import pyarrow.parquet as pq

    table = pq.read_table(root / METADATA_FILE, columns=["patch_id"])
    raw = (table.schema.metadata or {}).get(SKIPPED_KEY, b"{}")
    return SampleReport(root, [str(p) for p in table.column("patch_id").to_pylist()], json.loads(raw), reused=True)


def materialise_sample(root: str | Path, cache_dir: str | Path | None = None, force: bool = False) -> SampleReport:
    """Write the real reBEN sample into ``root`` in the BigEarthNet v2 layout.

    Args:
        root: Destination folder; it is owned by the sample and replaced as a whole.
        cache_dir: Where the wheel is downloaded and kept (default :func:`default_cache_dir`).
        force: Rebuild even when ``root/metadata.parquet`` already exists.

    Returns:
        The written patch ids and the skipped ones with their reasons.

    Raises:
        GacError: the wheel cannot be fetched or verified, or ``root`` holds something that is not a finished sample.
    """
    import rasterio

    root = Path(root)
    if (root / METADATA_FILE).is_file() and not force:
        return _read_existing(root)
    if root.exists() and any(root.iterdir()) and not force:
        raise GacError(f"{root} exists and is not a finished sample (no {METADATA_FILE}); pass --force to replace it")

    entries, rows = _read_wheel(fetch_wheel(cache_dir))
    keep: list[dict[str, object]] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for row in rows:
        patch_id = str(row["patch_id"])
        if patch_id in seen:
            continue
        seen.add(patch_id)
        reason = _check_patch(row, entries)
        if reason is None:
            keep.append(row)
        else:
            skipped[patch_id] = reason
    for key in sorted(entries):
        if key.startswith("S2") and key not in seen:
            skipped[key] = "in the LMDB but in no metadata file, so it has no labels or split"

    with atomic_path(root) as tmp, rasterio.Env(GDAL_PAM_ENABLED="NO"):
        tmp.mkdir()
        for sub in (S2_DIR, S1_DIR, REFERENCE_DIR):
            (tmp / sub).mkdir()
        for row in keep:
            patch_id, s1_name = str(row["patch_id"]), str(row["s1_name"])
            for band in S2_BANDS:
                _write_tif(s2_band_path(tmp, patch_id, band), entries[patch_id][band], patch_id, S2_GSD[band])
            for band in S1_BANDS:
                _write_tif(s1_band_path(tmp, s1_name, band), entries[s1_name][band], patch_id, 10)
        _write_metadata(tmp / METADATA_FILE, keep, skipped)
    return SampleReport(root, [str(r["patch_id"]) for r in keep], skipped)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m gac.data.sample --root data/reben-sample``; prints one line per skipped patch."""
    parser = argparse.ArgumentParser(prog="python -m gac.data.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="destination folder (BigEarthNet v2 layout)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the configilm wheel is kept")
    parser.add_argument("--force", action="store_true", help="rebuild even if ROOT/metadata.parquet exists")
    args = parser.parse_args(argv)
    try:
        report = materialise_sample(args.root, args.cache_dir, force=args.force)
    except GacError as exc:
        print(f"gac: error: {exc}", file=sys.stderr)
        return 2
    state = "already present" if report.reused else "written"
    print(f"{len(report.written)} real BigEarthNet v2 patches {state} in {report.root}")
    for patch_id, reason in report.skipped.items():
        print(f"skipped {patch_id}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
