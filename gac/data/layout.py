"""The BigEarthNet v2 (reBEN) folder layout, in one place.

Every reader and writer of raw tiles goes through these helpers so that the sample extractor, the synthetic generator
and the catalog agree with torchgeo's ``BigEarthNetV2`` reader byte for byte::

    <root>/metadata.parquet
    <root>/BigEarthNet-S2/<patch_id minus last two '_' parts>/<patch_id>/<patch_id>_<band>.tif
    <root>/BigEarthNet-S1/<s1_name minus last three '_' parts>/<s1_name>/<s1_name>_<VV|VH>.tif
    <root>/Reference_Maps/<patch_id minus last two '_' parts>/<patch_id>/<patch_id>_reference_map.tif
"""

from __future__ import annotations

import datetime
import functools
import re
from pathlib import Path

from gac.sensors import S1_BANDS, S2_BANDS

__all__ = ["S1_BANDS", "S2_BANDS"]  # re-exported: the layout names files by band

#: Native ground sampling distance of each S2 band in metres (10 m bands are 120 px, 20 m 60 px, 60 m 20 px).
S2_GSD: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20,
    "B07": 20, "B08": 10, "B8A": 20, "B09": 60, "B11": 20, "B12": 20,
}  # fmt: skip
#: Tile size in pixels at 10 m.
TILE_SIZE = 120
#: Columns of the real ``metadata.parquet``.
METADATA_COLUMNS: tuple[str, ...] = (
    "patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
    "contains_seasonal_snow", "contains_cloud_or_shadow",
)  # fmt: skip
#: The columns a root must have: what torchgeo's ``BigEarthNetV2`` itself reads to pair files (``labels`` too feeds its
#: targets, not ours). torchgeo's own test data has exactly these and ``labels``.
REQUIRED_COLUMNS: tuple[str, ...] = ("patch_id", "s1_name", "split")
#: Value of each other column when a root lacks it: country unknown, no labels, not flagged cloudy or snowy.
OPTIONAL_COLUMNS: dict[str, object] = {
    "labels": (),
    "country": "unknown",
    "s2v1_name": None,
    "contains_seasonal_snow": False,
    "contains_cloud_or_shadow": False,
}
SPLITS: tuple[str, ...] = ("train", "validation", "test")

S2_DIR = "BigEarthNet-S2"
S1_DIR = "BigEarthNet-S1"
REFERENCE_DIR = "Reference_Maps"
METADATA_FILE = "metadata.parquet"


def s2_tile_dir(patch_id: str) -> str:
    """The S2 parent folder: the patch id without its last two ``_`` parts (the row/column)."""
    return "_".join(patch_id.split("_")[:-2])


def s1_tile_dir(s1_name: str) -> str:
    """The S1 parent folder: the S1 name without its last three ``_`` parts (product suffix and row/column)."""
    return "_".join(s1_name.split("_")[:-3])


def s2_band_path(root: str | Path, patch_id: str, band: str) -> Path:
    """Path of one S2 band GeoTIFF of ``patch_id`` under ``root``."""
    return Path(root, S2_DIR, s2_tile_dir(patch_id), patch_id, f"{patch_id}_{band}.tif")


def s1_band_path(root: str | Path, s1_name: str, band: str) -> Path:
    """Path of one S1 polarisation GeoTIFF of ``s1_name`` under ``root``."""
    return Path(root, S1_DIR, s1_tile_dir(s1_name), s1_name, f"{s1_name}_{band}.tif")


def reference_map_path(root: str | Path, patch_id: str) -> Path:
    """Path of the CORINE reference map of ``patch_id`` under ``root``."""
    return Path(root, REFERENCE_DIR, s2_tile_dir(patch_id), patch_id, f"{patch_id}_reference_map.tif")


def acquisition_date(patch_id: str) -> datetime.date:
    """The acquisition date an S2 patch id carries in its third ``_`` part (``S2A_MSIL2A_<YYYYMMDD>T<hhmmss>_…``).

    Raises:
        ValueError: with a one-line reason when the id has no such part or it is no real date and time.
    """
    parts = patch_id.split("_")
    return _stamp_date(parts[2] if len(parts) >= 5 else "", len(parts))


@functools.lru_cache(maxsize=65536)
def _stamp_date(stamp: str, n_parts: int) -> datetime.date:
    """Parse one product time stamp; cached, since 550k patch ids share a few thousand products (12 s → 1 s)."""
    try:
        if not re.fullmatch(r"\d{8}T\d{6}", stamp):  # strptime alone accepts '201761T1010' (one-digit fields)
            raise ValueError(stamp)
        return datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%S").date()
    except ValueError:
        got = f"{stamp!r} as its third '_' part" if stamp else f"{n_parts} '_' parts"
        raise ValueError(f"no acquisition date (expected S2x_MSIL2A_<YYYYMMDD>T<hhmmss>_…, got {got})") from None


def s2_tile_name(patch_id: str) -> str:
    """The Sentinel-2 MGRS tile (e.g. ``T33UUP``) a patch lies on, read from its id."""
    return patch_id.split("_")[-3]


def write_metadata(path: str | Path, rows: list[dict], extra: dict[bytes, bytes]) -> None:
    """Write ``metadata.parquet`` with the real column types (``labels`` as ``list<string>``).

    ``extra`` goes into the parquet schema metadata (e.g. why sample patches were skipped, which synthetic tiles are
    broken), where it travels with the file without adding columns torchgeo does not expect.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("patch_id", pa.string()),
            ("labels", pa.list_(pa.string())),
            ("split", pa.string()),
            ("country", pa.string()),
            ("s1_name", pa.string()),
            ("s2v1_name", pa.string()),
            ("contains_seasonal_snow", pa.bool_()),
            ("contains_cloud_or_shadow", pa.bool_()),
        ],
        metadata=extra,
    )
    table = pa.Table.from_pylist([{c: r[c] for c in METADATA_COLUMNS} for r in rows], schema=schema)
    pq.write_table(table, path, compression="snappy", write_statistics=True)
