"""A seeded, physically modelled stand-in for BigEarthNet v2, written in the exact same layout.

Why it exists: tests and benchmarks need hundreds of tiles, known ground truth and deliberately broken files, none of
which the 21-patch real sample (:mod:`gac.data.sample`) can give. It is never a default data source; every file it
writes carries the GeoTIFF tags ``GAC_SOURCE=synthetic:seed=<seed>`` and
``GAC_GEOREFERENCE=synthetic:invented-tile-grid`` so it cannot be mistaken for real data.

The model, per 120×120 tile (10 m pixels):

* Land cover: argmax of a few Gaussian-smoothed white-noise fields (one per class drawn for the tile, each with a
  random bias), which gives irregular, spatially coherent regions like CORINE polygons. Each pixel holds a real
  CORINE Level-3 code; the BigEarthNet 19-class names of the codes present become the ``labels``.
* Sentinel-2 L2A: per-class mean spectra in DN (reflectance × 10000) for all 12 bands, interpolated between a summer
  and a winter spectrum by the acquisition season (deciduous NIR collapses in winter, coniferous barely changes,
  water stays dark), times a smooth within-class texture. 20 m and 60 m bands are block averages of that 10 m field,
  written at native resolution (60×60, 20×20) as in the real product, then every band gets 2 % Gaussian noise per
  native pixel. Northern winter tiles may be snow-covered on open land (then ``contains_seasonal_snow`` is true).
* Sentinel-1 GRD: per-class σ0 in dB for VV and VH, converted to linear power, multiplied by 4-look gamma speckle
  (mean 1), plus a small smooth texture, and back to dB (float32), as in BigEarthNet's S1 patches.
* S1 and S2 share the land-cover map, hence the class boundaries, and one UTM georeference per tile.
* Names follow the real reBEN forms: ``S2A_MSIL2A_<date>T<time>_N9999_R<orbit>_<tile>_<X>_<Y>`` and
  ``S1A_IW_GRDH_1SDV_<date>T<time>_<tile without T>_<X>_<Y>`` (the real data keeps X_Y in the same order in both),
  ``s2v1_name`` = ``S2A_MSIL2A_<date>T<time>_<X>_<Y>``. Tile origins and grid positions are invented but plausible
  (UTM zones 29, 33, 34, 35 over Portugal, Ireland, Austria, Serbia, Finland, Lithuania; four seasons).

``broken`` asks for tiles that a catalog must reject, each kept in ``metadata.parquet``: ``missing_band`` (no B05
file), ``corrupt_tiff`` (B04 is garbage bytes behind a TIFF magic), ``wrong_shape`` (B03 is 118×120 instead of
120×120) and ``nan_sar`` (the first 20 rows of S1 VV are NaN). Which tiles are broken is stored in the parquet schema
metadata (see :func:`broken_patches`). Everything depends only on ``seed`` (tile ``i`` on ``(seed, i)``, plus the
grid cells of earlier tiles so that no patch id repeats), so the bytes are identical across runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import struct
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gac.data.layout import (
    METADATA_FILE,
    REFERENCE_DIR,
    S1_BANDS,
    S1_DIR,
    S2_BANDS,
    S2_DIR,
    S2_GSD,
    SPLITS,
    TILE_SIZE,
    reference_map_path,
    s1_band_path,
    s2_band_path,
    write_metadata,
)
from gac.errors import GacError
from gac.io.atomic import atomic_path

#: Kinds of deliberately broken tiles :func:`generate` can produce.
BROKEN_KINDS: tuple[str, ...] = ("missing_band", "corrupt_tiff", "wrong_shape", "nan_sar")
#: Parquet schema-metadata key listing the broken tiles ({patch_id: kind}).
BROKEN_KEY = b"gac:synthetic-broken"
SOURCE_TAG = "GAC_SOURCE"
#: Same tag as the real sample's reconstructed georeference, so a catalog records that this one is invented.
GEOREFERENCE_TAG = "GAC_GEOREFERENCE"
GEOREFERENCE_VALUE = "synthetic:invented-tile-grid"

#: CORINE Level-3 code -> BigEarthNet 19-class name (the official reBEN mapping, restricted to the codes used here).
CLC_TO_BEN19: dict[int, str] = {
    112: "Urban fabric",
    121: "Industrial or commercial units",
    211: "Arable land",
    231: "Pastures",
    242: "Complex cultivation patterns",
    311: "Broad-leaved forest",
    312: "Coniferous forest",
    313: "Mixed forest",
    411: "Inland wetlands",
    512: "Inland waters",
}

# Summer mean L2A DN per class in S2_BANDS order (B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12). Values follow
# typical Sentinel-2 surface reflectance: vegetation has low red, a red edge and NIR 2500-4000; water is dark
# everywhere with NIR ~200 and almost no SWIR; built-up is bright and flat with high SWIR.
_SUMMER: dict[int, tuple[int, ...]] = {
    112: (1200, 1100, 1150, 1250, 1450, 1650, 1750, 1850, 1900, 1000, 2300, 1950),
    121: (1400, 1350, 1400, 1500, 1650, 1800, 1900, 2000, 2050, 1100, 2700, 2400),
    211: (800, 450, 750, 550, 1150, 2600, 3200, 3500, 3650, 1300, 2250, 1250),
    231: (700, 350, 650, 400, 1000, 2700, 3300, 3600, 3750, 1300, 1900, 900),
    242: (800, 450, 700, 550, 1100, 2400, 2900, 3200, 3300, 1200, 2200, 1200),
    311: (500, 250, 450, 250, 700, 2500, 3400, 3800, 3950, 1300, 1600, 700),
    312: (400, 200, 350, 180, 550, 1700, 2300, 2600, 2700, 1000, 1100, 500),
    313: (450, 230, 400, 220, 620, 2100, 2850, 3200, 3300, 1150, 1350, 600),
    411: (600, 350, 550, 400, 800, 1600, 1900, 2100, 2200, 900, 1200, 600),
    512: (600, 500, 450, 300, 250, 220, 210, 200, 180, 100, 60, 40),
}
# Winter multiplier per class for the visible (B01-B04), red-edge (B05-B07), NIR (B08, B8A, B09) and SWIR groups:
# deciduous canopy and crops lose NIR and gain red (bare soil, litter), conifers change little, low sun darkens all.
_WINTER_GAIN: dict[int, tuple[float, float, float, float]] = {
    112: (0.85, 0.85, 0.85, 0.85),
    121: (0.85, 0.85, 0.85, 0.85),
    211: (1.6, 0.8, 0.55, 1.2),
    231: (1.3, 0.8, 0.65, 1.1),
    242: (1.4, 0.8, 0.6, 1.15),
    311: (1.5, 0.7, 0.45, 1.3),
    312: (0.9, 0.85, 0.85, 0.9),
    313: (1.2, 0.75, 0.65, 1.1),
    411: (1.2, 0.8, 0.7, 1.0),
    512: (0.8, 0.8, 0.8, 0.8),
}
_BAND_GROUP = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
#: Fresh snow: very bright in the visible and NIR, dark in the SWIR (the NDSI signature).
_SNOW = (8500, 8800, 8700, 8600, 8400, 8200, 8000, 7800, 7600, 3500, 900, 700)
#: Classes snow can cover (open land; not forest canopy, water or roofs cleared of it).
_SNOWABLE = (211, 231, 242, 411)

#: σ0 in dB (VV, VH) per class, C band, ~35° incidence: calm water is a specular mirror, built-up has double bounce,
#: forest volume scattering, fields in between.
_SIGMA0: dict[int, tuple[float, float]] = {
    112: (-5.0, -12.0),
    121: (-4.0, -11.0),
    211: (-12.0, -18.0),
    231: (-11.0, -17.5),
    242: (-11.0, -17.0),
    311: (-8.0, -14.0),
    312: (-8.5, -14.5),
    313: (-8.0, -14.0),
    411: (-14.0, -21.0),
    512: (-20.0, -27.0),
}
_LOOKS = 4
#: Below this many tiles one process is faster than starting a pool.
_PARALLEL_MIN_TILES = 64


@dataclass(frozen=True)
class _Tile:
    """One invented Sentinel-2 tile: where it is, which classes occur there, and which zone it projects into."""

    country: str
    name: str
    epsg: int
    x0: float
    y0: float
    classes: tuple[int, ...]
    north: bool


_TILES: tuple[_Tile, ...] = (
    _Tile("Austria", "T33UUP", 32633, 300000.0, 5400000.0, (112, 211, 231, 242, 311, 312, 313, 512), False),
    _Tile("Portugal", "T29SND", 32629, 499980.0, 4300020.0, (112, 121, 211, 242, 311, 312, 512), False),
    _Tile("Finland", "T35VLH", 32635, 300000.0, 6900000.0, (112, 211, 312, 313, 411, 512), True),
    _Tile("Ireland", "T29UPV", 32629, 600000.0, 6000000.0, (112, 211, 231, 312, 411, 512), False),
    _Tile("Serbia", "T34TDQ", 32634, 399960.0, 5000040.0, (112, 121, 211, 242, 311, 313, 512), False),
    _Tile("Lithuania", "T35ULA", 32635, 300000.0, 6200040.0, (112, 211, 231, 312, 313, 411, 512), True),
)
#: (season weight 1 = summer .. 0 = winter, S2 date, S2 time, relative orbit, S1 platform, S1 date, S1 time).
_SEASONS: tuple[tuple[float, str, str, int, str, str, str], ...] = (
    (1.0, "20170613", "101031", 22, "S1A", "20170613", "165043"),
    (0.5, "20171008", "100021", 122, "S1B", "20171007", "053412"),
    (0.0, "20180212", "102109", 65, "S1B", "20180211", "165809"),
    (0.5, "20180421", "094029", 36, "S1A", "20180420", "052354"),
)


def _gaussian_filter_fft(fields: np.ndarray, sigma: float, pad: int) -> np.ndarray:
    """Smooth the last two axes with a Gaussian (periodic FFT on a padded grid, then the padding is cut off)."""
    h, w = fields.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    out = np.fft.irfft2(np.fft.rfft2(fields) * kernel, s=(h, w))
    return out[..., pad : h - pad, pad : w - pad]


_COARSE = 4  # land-cover fields are smooth over >= 7 px, so they are drawn at 40 m and interpolated to 10 m
_COARSE_SIDE = TILE_SIZE // _COARSE


def _upsample_matrix() -> np.ndarray:
    """(120, 32) linear-interpolation weights from a 30-cell coarse grid with one cell of margin to 10 m centres."""
    centres = (np.arange(TILE_SIZE) + 0.5) / _COARSE - 0.5 + 1.0  # in coarse cells, shifted by the margin
    lo = np.floor(centres).astype(int)
    frac = centres - lo
    m = np.zeros((TILE_SIZE, _COARSE_SIDE + 2))
    m[np.arange(TILE_SIZE), lo] = 1.0 - frac
    m[np.arange(TILE_SIZE), lo + 1] = frac
    return m


_UPSAMPLE = _upsample_matrix()


def _land_cover(rng: np.random.Generator, tile: _Tile) -> np.ndarray:
    """A 120×120 map of CORINE codes: the argmax of smoothed random fields of 2-5 of the tile's classes."""
    n = int(rng.integers(2, 6))
    classes = rng.choice(np.array(tile.classes), size=n, replace=False)
    sigma = float(rng.uniform(7.0, 16.0)) / _COARSE
    pad = 8
    noise = rng.standard_normal((n, _COARSE_SIDE + 2 + 2 * pad, _COARSE_SIDE + 2 + 2 * pad))
    coarse = _gaussian_filter_fft(noise, sigma, pad)
    coarse /= coarse.std(axis=(1, 2), keepdims=True) + 1e-12
    coarse += rng.normal(0.0, 0.6, size=(n, 1, 1))
    fields = _UPSAMPLE @ coarse @ _UPSAMPLE.T
    return classes[np.argmax(fields, axis=0)].astype(np.uint16)


_CODES = np.array(sorted(CLC_TO_BEN19))
_SUMMER_LUT = np.array([_SUMMER[c] for c in _CODES], dtype=np.float32)
_WINTER_LUT = _SUMMER_LUT * np.array([_WINTER_GAIN[c] for c in _CODES], dtype=np.float32)[:, _BAND_GROUP]
_SIGMA0_LUT = np.array([_SIGMA0[c] for c in _CODES], dtype=np.float32)


def _texture(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """A 120×120 smooth, unit-variance float32 field: within-class variation (soil moisture, canopy density)."""
    field = _gaussian_filter_fft(rng.standard_normal((TILE_SIZE + 16, TILE_SIZE + 16)), sigma, 8)
    return (field / (field.std() + 1e-12)).astype(np.float32)


def _s2_bands(rng: np.random.Generator, lut_index: np.ndarray, season: float, snow: bool) -> dict[str, np.ndarray]:
    """Native-resolution uint16 DN per S2 band, from the class index of each 10 m pixel."""
    spectra = season * _SUMMER_LUT + (1.0 - season) * _WINTER_LUT
    if snow:
        spectra[np.searchsorted(_CODES, _SNOWABLE)] = _SNOW
    field = spectra.T[:, lut_index]  # (12, 120, 120) class means at 10 m
    field *= 1.0 + 0.05 * _texture(rng, 2.0)
    out: dict[str, np.ndarray] = {}
    for i, band in enumerate(S2_BANDS):
        k = S2_GSD[band] // 10
        side = TILE_SIZE // k
        block = field[i] if k == 1 else field[i].reshape(side, k, side, k).mean(axis=(1, 3))
        block *= 1.0 + 0.02 * rng.standard_normal(block.shape, dtype=np.float32)  # sensor noise per native pixel
        out[band] = np.clip(np.rint(block), 1, 65535).astype(np.uint16)
    return out


def _s1_bands(rng: np.random.Generator, lut_index: np.ndarray, season: float) -> dict[str, np.ndarray]:
    """float32 σ0 in dB per polarisation: class mean × 4-look gamma speckle, in linear power."""
    sigma = _SIGMA0_LUT.copy()
    # Bare winter fields are rougher and wetter than summer canopies: +1 dB at most, only on arable land.
    sigma[np.searchsorted(_CODES, 211)] += (1.0 - season) * 1.0
    out: dict[str, np.ndarray] = {}
    for p, band in enumerate(S1_BANDS):
        linear = 10.0 ** ((sigma[lut_index, p] + 0.5 * _texture(rng, 3.0)) / 10.0)
        speckle = rng.gamma(shape=_LOOKS, scale=1.0 / _LOOKS, size=linear.shape)
        out[band] = (10.0 * np.log10(linear * speckle)).astype(np.float32)
    return out


@dataclass(frozen=True)
class _Name:
    """Where and when tile ``index`` was "acquired": drawn in a first, sequential pass so patch ids never repeat."""

    index: int
    tile: int
    season: int
    col: int
    row: int

    @property
    def patch_id(self) -> str:
        _, date, time, orbit, *_ = _SEASONS[self.season]
        return f"S2A_MSIL2A_{date}T{time}_N9999_R{orbit:03d}_{_TILES[self.tile].name}_{self.col}_{self.row}"

    @property
    def s1_name(self) -> str:
        *_, sat, date, time = _SEASONS[self.season]
        return f"{sat}_IW_GRDH_1SDV_{date}T{time}_{_TILES[self.tile].name[1:]}_{self.col}_{self.row}"

    @property
    def s2v1_name(self) -> str:
        _, date, time, *_ = _SEASONS[self.season]
        return f"S2A_MSIL2A_{date}T{time}_{self.col}_{self.row}"


def _names(seed: int, n_tiles: int, scene_side: int = 0) -> list[_Name]:
    """Tile, season and grid cell of every patch; a cell already used by the same product is drawn again.

    With ``scene_side`` k, the first k² patches are one product's k x k block of adjacent cells (a scene, row-major):
    what ``stage1.mosaic`` generates as one mosaic. Their pixels are drawn per tile, like every other tile's.
    """
    used: set[str] = set()
    names: list[_Name] = []
    block = np.random.default_rng([seed, 0x5CE7E])
    tile0, season0 = int(block.integers(len(_TILES))), int(block.integers(len(_SEASONS)))
    col0, row0 = (int(v) for v in block.integers(0, 91 - scene_side, size=2)) if scene_side else (0, 0)
    for i in range(n_tiles):
        if i < scene_side**2:
            name = _Name(i, tile0, season0, col0 + i % scene_side, row0 + i // scene_side)
            used.add(name.patch_id)
            names.append(name)
            continue
        rng = np.random.default_rng([seed, i, 0])
        tile, season = int(rng.integers(len(_TILES))), int(rng.integers(len(_SEASONS)))
        while True:
            col, row = (int(v) for v in rng.integers(0, 91, size=2))
            name = _Name(i, tile, season, col, row)
            if name.patch_id not in used:
                break
        used.add(name.patch_id)
        names.append(name)
    return names


_SHORT, _LONG, _DOUBLE, _ASCII = 3, 4, 12, 2
_STRUCT = {_SHORT: "H", _LONG: "I", _DOUBLE: "d"}


def geotiff_bytes(array: np.ndarray, epsg: int, x: float, y: float, tags: dict[str, str]) -> bytes:
    """Encode a single-band, uncompressed, one-strip little-endian GeoTIFF of ``array`` in memory.

    Why not rasterio: creating a GDAL dataset costs ~3 ms a file and a tile has 15 files, which made 200 tiles take
    ~10 s; this encoder takes a fraction of that, and its bytes do not depend on the installed GDAL. It writes what
    GDAL itself writes for such a file: baseline TIFF tags, ``ModelPixelScale`` + ``ModelTiepoint`` (upper-left corner
    at ``(x, y)``, pixel size 1200 m over the width, so a short band keeps the 10 m grid), GeoKeys for a projected
    ``EPSG:<epsg>`` CRS with pixel-is-area, and ``GDAL_METADATA`` for the dataset tags. Tests read it back with
    rasterio and torchgeo.
    """
    from xml.sax.saxutils import escape

    array = np.ascontiguousarray(array)
    height, width = array.shape
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    items = "".join(f'  <Item name="{escape(k, {chr(34): "&quot;"})}">{escape(v)}</Item>\n' for k, v in tags.items())
    gsd = 1200.0 / width
    entries: list[tuple[int, int, Sequence[float] | bytes]] = [
        (256, _LONG, [width]),  # ImageWidth
        (257, _LONG, [height]),  # ImageLength
        (258, _SHORT, [array.dtype.itemsize * 8]),  # BitsPerSample
        (259, _SHORT, [1]),  # Compression: none
        (262, _SHORT, [1]),  # PhotometricInterpretation: BlackIsZero
        (273, _LONG, [8]),  # StripOffsets: the pixels follow the header
        (277, _SHORT, [1]),  # SamplesPerPixel
        (278, _LONG, [height]),  # RowsPerStrip: one strip
        (279, _LONG, [len(data)]),  # StripByteCounts
        (284, _SHORT, [1]),  # PlanarConfiguration: contiguous
        (339, _SHORT, [3 if array.dtype.kind == "f" else 1]),  # SampleFormat: IEEE float or unsigned int
        (33550, _DOUBLE, [gsd, gsd, 0.0]),  # ModelPixelScaleTag
        (33922, _DOUBLE, [0.0, 0.0, 0.0, x, y, 0.0]),  # ModelTiepointTag: pixel (0, 0) -> (x, y)
        # GeoKeyDirectory v1.1.0, 3 keys: GTModelType projected, GTRasterType pixel-is-area, ProjectedCSType EPSG.
        (34735, _SHORT, [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg]),
        (42112, _ASCII, f"<GDALMetadata>\n{items}</GDALMetadata>\n".encode() + b"\0"),  # GDAL_METADATA
    ]
    ifd_offset = 8 + len(data) + (len(data) & 1)  # IFDs start on a word boundary
    extra_offset = ifd_offset + 2 + 12 * len(entries) + 4
    ifd = [struct.pack("<H", len(entries))]
    extra: list[bytes] = []
    for tag, kind, values in entries:
        payload = values if isinstance(values, bytes) else struct.pack(f"<{len(values)}{_STRUCT[kind]}", *values)
        if len(payload) <= 4:
            ifd.append(struct.pack("<HHI", tag, kind, len(values)) + payload.ljust(4, b"\0"))
        else:
            ifd.append(struct.pack("<HHII", tag, kind, len(values), extra_offset))
            payload += b"\0" * (len(payload) & 1)
            extra.append(payload)
            extra_offset += len(payload)
    ifd.append(struct.pack("<I", 0))  # no next IFD
    header = b"II*\0" + struct.pack("<I", ifd_offset)
    return b"".join([header, data, b"\0" * (len(data) & 1), *ifd, *extra])


def _write_tif(path: Path, array: np.ndarray, epsg: int, x: float, y: float, seed: int) -> None:
    """Write one synthetic GeoTIFF with the provenance tags."""
    tags = {SOURCE_TAG: f"synthetic:seed={seed}", GEOREFERENCE_TAG: GEOREFERENCE_VALUE}
    path.write_bytes(geotiff_bytes(array, epsg, x, y, tags))


def _build_and_write(root: Path, seed: int, name: _Name, kind: str | None, split: str) -> dict[str, object]:
    """Model tile ``name.index``, write its files (broken as ``kind`` asks) and return its metadata row.

    The pixels depend only on ``(seed, index)``, so tiles can be built in any order or process.
    """
    rng = np.random.default_rng([seed, name.index, 1])
    tile = _TILES[name.tile]
    season = _SEASONS[name.season][0]
    lc = _land_cover(rng, tile)
    lut_index = np.searchsorted(_CODES, lc)
    snow = tile.north and season == 0.0 and bool(np.isin(lc, _SNOWABLE).any()) and bool(rng.random() < 0.7)
    s2, s1 = _s2_bands(rng, lut_index, season, snow), _s1_bands(rng, lut_index, season)
    patch_id, s1_name = name.patch_id, name.s1_name
    x, y = tile.x0 + 1200.0 * name.col, tile.y0 - 1200.0 * name.row

    if kind == "missing_band":
        del s2["B05"]
    elif kind == "wrong_shape":
        s2["B03"] = s2["B03"][:-2]
    elif kind == "nan_sar":
        s1["VV"][:20] = np.nan
    s2_band_path(root, patch_id, "B01").parent.mkdir(parents=True, exist_ok=True)
    for band, array in s2.items():
        path = s2_band_path(root, patch_id, band)
        if kind == "corrupt_tiff" and band == "B04":
            garbage = np.random.default_rng([seed, name.index, 2]).integers(0, 256, 4096, dtype=np.uint8)
            path.write_bytes(b"II*\x00" + garbage.tobytes())
        else:
            _write_tif(path, array, tile.epsg, x, y, seed)
    s1_band_path(root, s1_name, "VV").parent.mkdir(parents=True, exist_ok=True)
    for band, array in s1.items():
        _write_tif(s1_band_path(root, s1_name, band), array, tile.epsg, x, y, seed)
    reference_map_path(root, patch_id).parent.mkdir(parents=True, exist_ok=True)
    _write_tif(reference_map_path(root, patch_id), lc, tile.epsg, x, y, seed)
    return {
        "patch_id": patch_id,
        "labels": sorted({CLC_TO_BEN19[int(c)] for c in np.unique(lc)}),
        "split": split,
        "country": tile.country,
        "s1_name": s1_name,
        "s2v1_name": name.s2v1_name,
        "contains_seasonal_snow": snow,
        "contains_cloud_or_shadow": False,
    }


def _build_chunk(args: tuple[Path, int, list[tuple[_Name, str | None, str]]]) -> list[dict[str, object]]:
    """Worker entry point: build a contiguous chunk of tiles (module level so a process pool can pickle it)."""
    root, seed, jobs = args
    return [_build_and_write(root, seed, name, kind, split) for name, kind, split in jobs]


def _plan_broken(n_tiles: int, seed: int, broken: dict[str, int] | None) -> dict[int, str]:
    """Which tile indices are broken and how, drawn from the seed so the choice is reproducible."""
    if not broken:
        return {}
    unknown = sorted(set(broken) - set(BROKEN_KINDS))
    if unknown:
        raise GacError(f"broken: unknown kinds {unknown}; expected some of {list(BROKEN_KINDS)}")
    if any(int(v) < 0 for v in broken.values()):
        raise GacError("broken: counts must be non-negative")
    total = sum(int(v) for v in broken.values())
    if total > n_tiles:
        raise GacError(f"broken: {total} broken tiles asked for but only n_tiles={n_tiles}")
    order = np.random.default_rng([seed, 0xB0B]).permutation(n_tiles)
    plan: dict[int, str] = {}
    pos = 0
    for kind in BROKEN_KINDS:
        for _ in range(int(broken.get(kind, 0))):
            plan[int(order[pos])] = kind
            pos += 1
    return plan


def _write_metadata(path: Path, rows: list[dict[str, object]], broken: dict[str, str], seed: int) -> None:
    """Write the metadata rows; which tiles are broken (and the seed) go into the schema metadata."""
    extra = {BROKEN_KEY: json.dumps(broken, sort_keys=True).encode(), b"gac:synthetic-seed": str(seed).encode()}
    write_metadata(path, rows, extra)


def broken_patches(root: str | Path) -> dict[str, str]:
    """The ``{patch_id: kind}`` of the deliberately broken tiles of a synthetic ``root`` (empty for real data)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(Path(root, METADATA_FILE)).metadata or {}
    return json.loads(metadata.get(BROKEN_KEY, b"{}"))


def generate(
    root: str | Path,
    n_tiles: int,
    seed: int = 0,
    broken: dict[str, int] | None = None,
    workers: int | None = None,
    scene_side: int = 0,
) -> list[str]:
    """Write ``n_tiles`` synthetic tiles into ``root`` (replaced as a whole, atomically).

    Args:
        root: Destination folder in the BigEarthNet v2 layout.
        n_tiles: Number of patches (each with 12 S2 bands, VV, VH and a reference map).
        seed: Everything is a function of it.
        broken: ``{kind: count}`` of deliberately broken tiles, kinds from :data:`BROKEN_KINDS`.
        workers: Processes to build tiles in (default: one per core for 64+ tiles, else 1). The bytes do not
            depend on it.
        scene_side: Make the first ``scene_side``² tiles one product's square block of adjacent cells (a scene for
            ``stage1.mosaic``); 0 (default) leaves every cell to chance, as before.

    Returns:
        The patch ids in ``metadata.parquet`` order.

    Raises:
        GacError: ``n_tiles`` < 1 or an impossible ``broken`` request.
    """
    if n_tiles < 1:
        raise GacError(f"n_tiles must be at least 1, got {n_tiles}")
    if scene_side < 0 or scene_side**2 > n_tiles or scene_side > 90:
        raise GacError(f"scene_side must be 0 to 90 with scene_side² ≤ n_tiles ({n_tiles}), got {scene_side}")
    plan = _plan_broken(n_tiles, seed, broken)
    split_order = np.random.default_rng([seed, 0x5917]).permutation(n_tiles)
    splits = {int(i): SPLITS[k % len(SPLITS)] for k, i in enumerate(split_order)}
    jobs = [(name, plan.get(name.index), splits[name.index]) for name in _names(seed, n_tiles, scene_side)]
    workers = _workers(n_tiles) if workers is None else max(1, workers)
    with atomic_path(root) as tmp:
        tmp.mkdir()
        for sub in (S2_DIR, S1_DIR, REFERENCE_DIR):
            (tmp / sub).mkdir()
        step = -(-n_tiles // workers)
        chunks = [(tmp, seed, jobs[k : k + step]) for k in range(0, n_tiles, step)]
        if workers == 1:
            results = [_build_chunk(chunk) for chunk in chunks]
        else:
            # spawn, not fork: the caller may hold threads (torch, GDAL) that a forked child would inherit half-locked.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                results = list(pool.map(_build_chunk, chunks))
        rows = [row for chunk in results for row in chunk]
        broken_ids = {name.patch_id: kind for name, kind, _ in jobs if kind is not None}
        _write_metadata(tmp / METADATA_FILE, rows, broken_ids, seed)
    return [str(r["patch_id"]) for r in rows]


def restamp(root: str | Path, patch_id: str, stamp: str) -> str:
    """Give tile ``patch_id`` of ``root`` the product time stamp ``stamp`` (its third ``_`` part) in
    ``metadata.parquet`` (``patch_id`` and ``s2v1_name``) and on disk (its S2 bands and reference map move to the
    folders the new name gives); returns the new patch id. The S1 pair is left as it is.

    Why: real roots hold names whose stamp no date can be read from, e.g. ``…_20170924T93020_…`` (a time with 5
    digits); this writes such a tile, with its files in the exact BigEarthNet v2 layout, from an intact one.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    root = Path(root)
    parts = patch_id.split("_")
    parts[2] = stamp
    new = "_".join(parts)
    moves = [(s2_band_path(root, patch_id, b), s2_band_path(root, new, b)) for b in S2_BANDS]
    moves.append((reference_map_path(root, patch_id), reference_map_path(root, new)))
    for old_path, new_path in moves:
        new_path.parent.mkdir(parents=True, exist_ok=True)
        if old_path.is_file():  # a deliberately broken tile may lack one
            old_path.rename(new_path)
    for old_path, _ in moves:  # the old patch folders, and their tile folders once empty
        for folder in (old_path.parent, old_path.parent.parent):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    path = root / METADATA_FILE
    extra = pq.read_schema(path).metadata or {}
    rows = pd.read_parquet(path).to_dict("records")
    for row in rows:
        if row["patch_id"] == patch_id:
            row["patch_id"] = new
            row["s2v1_name"] = "_".join([*row["s2v1_name"].split("_")[:2], stamp, *row["s2v1_name"].split("_")[3:]])
        row["labels"] = list(row["labels"])
    write_metadata(path, rows, extra)
    return new


def _workers(n_tiles: int) -> int:
    """Processes worth starting: one per core, but none extra for small runs where start-up would dominate."""
    if n_tiles < _PARALLEL_MIN_TILES:
        return 1
    return max(1, min(os.cpu_count() or 1, 8, n_tiles // (_PARALLEL_MIN_TILES // 2)))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m gac.data.synthetic --root data/synthetic --n-tiles 200 --seed 0``."""
    parser = argparse.ArgumentParser(prog="python -m gac.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="destination folder (replaced)")
    parser.add_argument("--n-tiles", type=int, default=200, help="number of tiles (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        ids = generate(args.root, args.n_tiles, args.seed)
    except GacError as exc:
        print(f"gac: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(ids)} synthetic tiles written in {args.root} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())


#: :func:`heteroscedastic_noise`: the band whose smoothed level decides how noisy a pixel is (B08, NIR) and the ramp
#: over it (DN): below the first value the noise is :data:`NOISE_FRACTION` [0] of the band's level, above the second
#: [1], linear between.
NOISE_DRIVER, NOISE_RAMP_DN = S2_BANDS.index("B08"), (1500.0, 3000.0)
NOISE_FRACTION = (0.01, 0.2)
#: Smoothing (Gaussian, px) of the levels σ is computed from: σ varies over regions, not from pixel to pixel.
NOISE_SMOOTHING_PX = 2.0


def heteroscedastic_noise(s2_dn: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``s2_dn`` (N, 12, H, W) plus Gaussian noise of a *known*, spatially varying σ: ``(noisy uint16 DN, σ DN)``.

    Why: to test a model's per-pixel σ (``stage2/3.nll_weight``) against the truth, the world must hold noise that
    no input can predict (fresh draws, independent of everything) but whose *size* can be predicted from what the
    model sees. Here σ grows with the smoothed NIR level — dense vegetation, whose reflectance varies between dates
    and cannot be recovered from another acquisition — from 1 % of a band's smoothed level (water, bare ground,
    NIR ≤ 1500 DN) to 20 % (NIR ≥ 3000 DN), per pixel and band (:data:`NOISE_RAMP_DN`, :data:`NOISE_FRACTION`). A
    blurred and colour-shifted copy of the tile still shows those levels, so σ is learnable from it; the draws are
    not. Noise proportional to the level keeps y ≥ 0 (4 σ at most 80 % of it), so the clip to DN rarely cuts the
    Gaussian. Deterministic in ``seed``.
    """
    from scipy.ndimage import gaussian_filter

    levels = gaussian_filter(s2_dn.astype(np.float64), sigma=(0, 0, NOISE_SMOOTHING_PX, NOISE_SMOOTHING_PX))
    low, high = NOISE_RAMP_DN
    share = np.clip((levels[:, NOISE_DRIVER : NOISE_DRIVER + 1] - low) / (high - low), 0.0, 1.0)
    sigma = (NOISE_FRACTION[0] + (NOISE_FRACTION[1] - NOISE_FRACTION[0]) * share) * levels
    noisy = s2_dn + sigma * np.random.default_rng(seed).standard_normal(s2_dn.shape)
    return np.clip(np.rint(noisy), 0, 65535).astype(np.uint16), sigma.astype(np.float32)
