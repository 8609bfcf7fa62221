"""The BigEarthNet v2 (reBEN) folder layout, in one place.

Every reader and writer of raw tiles goes through these helpers so that the sample extractor, the synthetic generator
and the catalog agree with torchgeo's ``BigEarthNetV2`` reader byte for byte::

    <root>/metadata.parquet
    <root>/BigEarthNet-S2/<patch_id minus last two '_' parts>/<patch_id>/<patch_id>_<band>.tif
    <root>/BigEarthNet-S1/<s1_name minus last three '_' parts>/<s1_name>/<s1_name>_<VV|VH>.tif
    <root>/Reference_Maps/<patch_id minus last two '_' parts>/<patch_id>/<patch_id>_reference_map.tif
"""

from __future__ import annotations

from pathlib import Path

#: Sentinel-2 L2A bands in BigEarthNet v2 / torchgeo / TerraMind ``S2L2A`` order (B10 is not in L2A).
S2_BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
#: Native ground sampling distance of each S2 band in metres (10 m bands are 120 px, 20 m 60 px, 60 m 20 px).
S2_GSD: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20,
    "B07": 20, "B08": 10, "B8A": 20, "B09": 60, "B11": 20, "B12": 20,
}  # fmt: skip
#: Sentinel-1 GRD polarisations in TerraMind ``S1GRD`` order (torchgeo returns them the other way round).
S1_BANDS: tuple[str, ...] = ("VV", "VH")
#: Tile size in pixels at 10 m.
TILE_SIZE = 120
#: Columns of the real ``metadata.parquet``.
METADATA_COLUMNS: tuple[str, ...] = (
    "patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
    "contains_seasonal_snow", "contains_cloud_or_shadow",
)  # fmt: skip
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
