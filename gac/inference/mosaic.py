"""Scenes of adjacent tiles, generated together in overlapping, blended windows (``stage1.mosaic: true``).

Why: Stage 1 per tile reflect-pads each 120 px tile to the model size and throws the padding away; at TerraMind's
pretraining size (224 px) that is 3.5x the tile's pixels, filled with reflected copies of the tile itself. BigEarthNet
v2 tiles are not isolated, though: patch ``X_Y`` of a Sentinel-2 product is the 1200 m cell next to ``X+1_Y``. Over a
mosaic of neighbours each window of ``img_size`` px covers several tiles at once and gives every tile real context.

* **Scenes** (:func:`scenes`). Tiles of one product (same S2 tile and acquisition: the patch id without its ``_X_Y``,
  :func:`gac.data.layout.s2_tile_dir`; same CRS) sit at grid cell column ``X`` (east), row ``Y`` (south). The grid is
  checked against each tile's transform from the catalog: the transforms of a product's tiles must put all of them on
  one grid of 120 px cells (same origin, 1200 m cells for 10 m pixels); a tile that disagrees is generated alone. The
  cells of a product are cut into full rectangles (greedily: from the top-left-most remaining cell, the largest
  rectangle of present cells anchored there, at most :data:`MAX_SIDE` cells a side; row- or column-major, whichever
  keeps more neighbours together), so a scene's mosaic has no holes and its memory is bounded.
* **Windows** (:func:`axis_windows`, :func:`blend_weights`). The fewest windows of ``img_size`` px, :data:`OVERLAP` px
  apart from each other's edge, cover the mosaic; the mosaic is reflect-padded symmetrically to that cover, exactly as
  :func:`gac.models.geometry.pad_to` pads an isolated tile (same :func:`gac.models.geometry.margins`, same reflect
  rule). Overlaps
  are blended with TerraTorch's tiled-inference mask (``get_blend_mask``: cosine ramps), normalised so the weights of
  the windows covering a pixel sum to one, and exactly one where a single window covers it.
* **Edges.** Outside the scene (a missing neighbour, the product's edge, the end of a rectangle) the mosaic is
  reflected like an isolated tile's padding. A one-tile scene is therefore one window, the tile padded by ``pad_to``,
  with weight 1: the same model input, and the same bytes, as the per-tile path.

Windows of one batch go through the model together (``batch_size`` at a time), so a scene's output depends only on the
batch it is in; :func:`gac.inference.engine.run` never splits a scene across batches or shards (its ``group``), and
seeds each
batch from its identity, so 1 or K processes write the same bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from gac.data import layout
from gac.models import geometry
from gac.models.backend import uses_terratorch

TILE = layout.TILE_SIZE
#: Pixels two neighbouring windows share (blended); 32 keeps the windows on TerraMind's 16/32 px token grid.
OVERLAP = 32
#: Largest scene side in tiles: an 8 x 8 scene (960 px, 64 tiles) bounds a batch's memory and a shard's size.
MAX_SIDE = 8
#: The work-index column naming each tile's scene (the engine's ``group``).
SCENE = "scene"


@dataclass(frozen=True)
class Place:
    """Where a tile sits: its scene, its cell in it (row south, column east) and the scene's size in tiles."""

    scene: str
    row: int = 0
    col: int = 0
    rows: int = 1
    cols: int = 1


def grid_cell(patch_id: str) -> tuple[int, int] | None:
    """``(row, col)`` of a patch from its id's ``_X_Y`` (X east, Y south), or ``None`` if the id has no grid."""
    x, y = ([None, None] + patch_id.split("_"))[-2:]
    return (int(y), int(x)) if x and y and x.isdigit() and y.isdigit() else None


def _grid_origin(transform: Sequence[float], row: int, col: int) -> tuple[float, float, float] | None:
    """The grid origin and pixel size a tile's transform implies for its cell; ``None`` for a rotated/flipped one."""
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    if b or d or a <= 0 or e != -a:
        return None
    cell = TILE * a
    return round(c - cell * col, 3), round(f + cell * row, 3), a


def _rectangles(cells: set[tuple[int, int]], max_side: int) -> list[tuple[int, int, int, int]]:
    """Cut grid cells into full rectangles ``(row, col, rows, cols)``: the greedy cut of :func:`_greedy` row by row or
    column by column, whichever keeps more pairs of neighbours inside one rectangle (more tiles see real context)."""

    def pairs(rects: list[tuple[int, int, int, int]]) -> int:
        return sum(h * (w - 1) + w * (h - 1) for _, _, h, w in rects)

    by_rows = _greedy(cells, max_side)
    by_cols = [(r, c, h, w) for c, r, w, h in _greedy({(c, r) for r, c in cells}, max_side)]
    return by_cols if pairs(by_cols) > pairs(by_rows) else by_rows


def _greedy(cells: set[tuple[int, int]], max_side: int) -> list[tuple[int, int, int, int]]:
    """From the first remaining cell (row-major), the largest full rectangle anchored there, until none remain."""
    left, out = set(cells), []
    for r0, c0 in sorted(cells):
        if (r0, c0) not in left:
            continue
        best, height = (1, 1), max_side
        for w in range(1, max_side + 1):
            if (r0, c0 + w - 1) not in left:
                break
            h = 1
            while h < height and all((r0 + h, c0 + k) in left for k in range(w)):
                h += 1
            height = h  # a wider rectangle is never taller
            if w * h > best[0] * best[1]:
                best = (h, w)
        h, w = best
        left -= {(r0 + i, c0 + k) for i in range(h) for k in range(w)}
        out.append((r0, c0, h, w))
    return out


def scenes(index: pd.DataFrame, max_side: int = MAX_SIDE) -> tuple[pd.DataFrame, dict[str, Place]]:
    """Group catalog tiles into scenes (see the module doc).

    Returns the index reordered so that each scene's tiles are contiguous (scenes in the order of their first tile in
    ``index``, tiles row-major inside), with a :data:`SCENE` column, and each patch id's :class:`Place`. A tile
    without a grid cell, or whose transform disagrees with its product's grid, is a scene of its own.
    """
    places: dict[str, Place] = {}
    products: dict[tuple[str, str], dict[tuple[int, int], str]] = {}
    origins: dict[tuple[str, str], dict[str, tuple]] = {}
    for pid, crs, transform in zip(index["patch_id"], index["crs"], index["transform"], strict=True):
        cell = grid_cell(pid)
        origin = _grid_origin(transform, *cell) if cell else None
        if origin is None:
            places[pid] = Place(pid)
            continue
        key = (layout.s2_tile_dir(pid), str(crs))
        products.setdefault(key, {})[cell] = pid
        origins.setdefault(key, {})[pid] = origin
    for key, by_cell in products.items():
        votes = Counter(origins[key].values())
        grid = min(votes, key=lambda o: (-votes[o], o))  # the origin most tiles agree on
        on_grid = {cell: pid for cell, pid in by_cell.items() if origins[key][pid] == grid}
        for pid in set(by_cell.values()) - set(on_grid.values()):
            places[pid] = Place(pid)
        for r0, c0, h, w in _rectangles(set(on_grid), max_side):
            name = f"{key[0]}/{c0}_{r0}" if h * w > 1 else on_grid[(r0, c0)]
            for i in range(h):
                for k in range(w):
                    places[on_grid[(r0 + i, c0 + k)]] = Place(name, i, k, h, w)
    rows = index.reset_index(drop=True)
    scene = rows["patch_id"].map(lambda pid: places[pid].scene)
    keys = pd.DataFrame(
        {
            "first": scene.groupby(scene, sort=False).ngroup(),  # scenes numbered in order of their first tile
            "row": rows["patch_id"].map(lambda pid: places[pid].row),
            "col": rows["patch_id"].map(lambda pid: places[pid].col),
        }
    )
    order = keys.sort_values(["first", "row", "col"], kind="stable").index
    return rows.loc[order].assign(**{SCENE: scene.loc[order]}).reset_index(drop=True), places


def axis_windows(length: int, size: int, overlap: int = OVERLAP) -> tuple[int, list[int]]:
    """The cover (padded length) and window starts along one axis: the fewest windows of ``size`` px, each
    ``size - overlap`` px after the last, that cover ``length`` px (one window when ``length <= size``)."""
    stride = size - overlap
    n = 1 + max(0, -(-(length - size) // stride))
    return size + stride * (n - 1), [k * stride for k in range(n)]


@uses_terratorch
def blend_weights(
    height: int, width: int, size: int, overlap: int = OVERLAP
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Windows over a ``height`` x ``width`` px mosaic: their origins ``(y, x)`` in the padded cover and their blend
    weights ``(n, size, size)``, which sum to one at every pixel of the cover (exactly one where one window covers).

    The shape of each window's weight is TerraTorch's (``get_blend_mask``: cosine ramps over the overlaps, never 0).
    """
    from terratorch.tasks.tiled_inference import get_blend_mask

    (cover_h, ys), (cover_w, xs) = axis_windows(height, size, overlap), axis_windows(width, size, overlap)
    mask = get_blend_mask(size, size - overlap, size, size - overlap)
    origins = [(y, x) for y in ys for x in xs]
    total = torch.zeros(cover_h, cover_w)
    for y, x in origins:
        total[y : y + size, x : x + size] += mask
    return origins, torch.stack([mask / total[y : y + size, x : x + size] for y, x in origins])


def pad(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reflect-pad the last two axes of ``x`` symmetrically to ``height`` x ``width``:
    :func:`gac.models.geometry.pad_to`
    for a rectangle (its margins and its rule: replicate where a margin is not smaller than the image)."""
    top, bottom = geometry.margins(x.shape[-2], height)
    left, right = geometry.margins(x.shape[-1], width)
    mode = "replicate" if max(top, bottom, left, right) >= min(x.shape[-2:]) else "reflect"
    return F.pad(x, (left, right, top, bottom), mode=mode)


def _jobs(places: Sequence[Place]) -> list[list[int]]:
    """Indices of ``places`` per complete scene (in scene order); tiles of an incomplete scene one by one."""
    by_scene: dict[str, list[int]] = {}
    for i, place in enumerate(places):
        by_scene.setdefault(place.scene, []).append(i)
    jobs = []
    for idx in by_scene.values():
        first = places[idx[0]]
        cells = {(places[i].row, places[i].col) for i in idx}
        complete = len(idx) == len(cells) == first.rows * first.cols
        jobs.extend([idx] if complete else [[i] for i in idx])
    return jobs


def generate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    tiles: torch.Tensor,
    places: Sequence[Place],
    size: int,
    batch_size: int,
    overlap: int = OVERLAP,
) -> torch.Tensor:
    """Apply ``forward`` (``(B, C, size, size)`` → ``(B, C_out, size, size)``) over scenes and cut the tiles back out.

    ``tiles`` ``(N, C, 120, 120)`` with their ``places``: tiles of a complete scene become one mosaic, padded, cut into
    windows, generated ``batch_size`` windows at a time (all the batch's windows in order), blended and cut back at
    the exact pixels; a tile whose scene is incomplete here (e.g. a neighbour was rejected) is generated alone.
    Returns ``(N, C_out, 120, 120)`` in the order of ``tiles``.
    """
    jobs, windows = [], []
    for idx in _jobs(places):
        cells = [(places[i].row, places[i].col) if len(idx) > 1 else (0, 0) for i in idx]
        height, width = (TILE * (1 + max(axis)) for axis in zip(*cells, strict=True))
        mosaic = tiles.new_zeros(tiles.shape[1], height, width)
        for i, (r, c) in zip(idx, cells, strict=True):
            mosaic[:, r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = tiles[i]
        origins, weights = blend_weights(height, width, size, overlap)
        cover = (origins[-1][0] + size, origins[-1][1] + size)
        padded = pad(mosaic, *cover)
        windows.extend(padded[:, y : y + size, x : x + size] for y, x in origins)
        jobs.append((idx, cells, origins, weights, cover, geometry.margins(height, cover[0])[0],
                     geometry.margins(width, cover[1])[0]))  # fmt: skip
    generated = iter(
        torch.cat([forward(torch.stack(windows[k : k + batch_size])) for k in range(0, len(windows), batch_size)])
    )
    result: list[torch.Tensor | None] = [None] * len(tiles)
    for idx, cells, origins, weights, cover, top, left in jobs:
        blended = None
        for (y, x), weight in zip(origins, weights, strict=True):
            window = next(generated)
            if blended is None:
                blended = window.new_zeros(window.shape[0], *cover)
            blended[:, y : y + size, x : x + size] += weight.to(window.device) * window
        for i, (r, c) in zip(idx, cells, strict=True):
            result[i] = blended[:, top + r * TILE : top + (r + 1) * TILE, left + c * TILE : left + (c + 1) * TILE]
    return torch.stack(result)
