"""Stage 1 over scenes (``stage1.mosaic: true``, :mod:`gac.inference.mosaic`): grouping, exact placement, blending,
resume, ranks.

The generator, its checkpoint, the synthetic catalog, the uninterrupted per-tile reference and the process helpers
are :mod:`test_stage1`'s (same seeded tiny TerraMind at 128 px, 1 step, 2-tile shards and batches), so a mosaic cache
here is byte-comparable with the per-tile cache there. The scene catalog puts two of those tiles side by side on one
product's grid (ids and transforms), the other two stay where they are (isolated).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import killpoint
import numpy as np
import pandas as pd
import pytest
import test_stage1 as base
import torch
from test_stage1 import (
    N_TILES,
    ONE_THREAD,
    BandTiler,
    assert_same_cache,
    cli,
    cli_params,
    first_shard_then_kill,
    pattern_s1,
    read_cache,
    write_catalog,
    write_params,
)

from gac.config import Stage1Params
from gac.inference import engine, mosaic
from gac.inference import generate as stage1
from gac.io.store import ShardStore

pytestmark = pytest.mark.usefixtures("one_thread")  # like test_stage1: caches compare byte for byte
#: test_stage1's fixtures, shared by name: the synthetic catalog, the seeded generator and its checkpoint, the
#: params that load it, and the uninterrupted per-tile cache of that catalog.
catalog, weights, p, model, reference = base.catalog, base.weights, base.p, base.model, base.reference
PRODUCT = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP"


def on_grid(cells: list[tuple[int, int]], product: str = PRODUCT, shift_m: float = 0.0) -> pd.DataFrame:
    """Catalog-like rows of ``product`` at grid cells ``(row, col)`` with the transforms the sample's rule gives
    (EPSG:32633, upper-left (300000, 5400000), 1200 m cells); ``shift_m`` moves every transform east."""
    return pd.DataFrame(
        {
            "patch_id": [f"{product}_{c}_{r}" for r, c in cells],
            "crs": "EPSG:32633",
            "transform": [
                [10.0, 0.0, 300000.0 + 1200 * c + shift_m, 0.0, -10.0, 5400000.0 - 1200 * r] for r, c in cells
            ],
        }
    )


# -- scenes ---------------------------------------------------------------------------------------------------------
def test_scenes_are_full_rectangles_of_one_product_on_the_grid_its_transforms_agree_on() -> None:
    other_date = PRODUCT.replace("20170613", "20170814")
    index = pd.concat(
        [
            on_grid([(5, 9)]),  # isolated (two cells from the block)
            on_grid([(1, 2), (1, 3), (2, 2), (2, 3), (3, 2)]),  # a 2 x 2 block and one more cell below it
            on_grid([(1, 4)], product=other_date),  # next to the block, but another acquisition
            on_grid([(2, 4)], shift_m=10.0),  # next to the block by its id, 10 m off by its transform
        ],
        ignore_index=True,
    )
    rows, places = mosaic.scenes(index)
    block = [f"{PRODUCT}_{c}_{r}" for r, c in [(1, 2), (1, 3), (2, 2), (2, 3)]]
    cells = [(0, 0), (0, 1), (1, 0), (1, 1)]
    expected = {pid: mosaic.Place(f"{PRODUCT}/2_1", r, c, 2, 2) for pid, (r, c) in zip(block, cells, strict=True)}
    assert {pid: places[pid] for pid in block} == expected
    alone = [f"{PRODUCT}_9_5", f"{PRODUCT}_2_3", f"{other_date}_4_1", f"{PRODUCT}_4_2"]
    assert [places[pid] for pid in alone] == [mosaic.Place(pid) for pid in alone]
    # each scene contiguous, scenes in the order of their first tile, row-major inside
    assert list(rows["patch_id"]) == [alone[0], *block, alone[1], alone[2], alone[3]]
    assert list(rows[mosaic.SCENE]) == [alone[0], *[f"{PRODUCT}/2_1"] * 4, *alone[1:]]


def test_gac_synth_scene_side_writes_one_scene_the_catalog_and_mosaic_find(tmp_path: Path) -> None:
    """``gac synth --scene-side 3`` (what ``make rehearse`` scores): its first 9 tiles are one 3 x 3 scene once read
    back through the catalog (ids and GeoTIFF transforms agree), the others stay isolated."""
    from gac.config import CatalogParams
    from gac.data import catalog as catalog_mod
    from gac.data import synthetic

    ids = synthetic.generate(tmp_path / "data", 11, seed=3, scene_side=3)
    catalog_mod.build(CatalogParams(out=str(tmp_path / "catalog"), workers=0), tmp_path / "data", progress=False)
    _, places = mosaic.scenes(ShardStore(tmp_path / "catalog").index)
    scene = {(places[pid].row, places[pid].col) for pid in ids[:9]}
    assert scene == {(r, c) for r in range(3) for c in range(3)}
    assert len({places[pid].scene for pid in ids[:9]}) == 1 and places[ids[0]].rows == places[ids[0]].cols == 3
    assert all(places[pid] == mosaic.Place(pid) for pid in ids[9:])


def test_engine_never_splits_a_scene_across_shards_or_batches() -> None:
    rows = pd.DataFrame({mosaic.SCENE: list("aabbbbcd")})
    assert engine.cuts(rows, 2) == [(0, 2), (2, 4), (4, 6), (6, 8)]  # no group: the fixed cuts
    assert engine.cuts(rows, 2, mosaic.SCENE) == [(0, 2), (2, 6), (6, 8)]  # "bbbb" alone, whole
    assert engine.cuts(rows, 3, mosaic.SCENE) == [(0, 2), (2, 6), (6, 8)]
    assert engine.cuts(rows, 8, mosaic.SCENE) == [(0, 8)]
    singles = pd.DataFrame({mosaic.SCENE: list("abcde")})
    assert engine.cuts(singles, 2, mosaic.SCENE) == engine.cuts(singles, 2)


# -- windows and blending -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("height", "width", "size"), [(120, 120, 128), (240, 240, 128), (600, 360, 224), (240, 960, 224)]
)
def test_blend_weights_sum_to_one_everywhere(height: int, width: int, size: int) -> None:
    origins, masks = mosaic.blend_weights(height, width, size)
    cover = (origins[-1][0] + size, origins[-1][1] + size)
    assert cover[0] >= height and cover[1] >= width
    total, count = torch.zeros(cover, dtype=torch.float64), torch.zeros(cover)
    for (y, x), mask in zip(origins, masks, strict=True):
        total[y : y + size, x : x + size] += mask
        count[y : y + size, x : x + size] += 1
    assert (masks > 0).all() and (count > 0).all()  # every pixel of the cover is generated
    assert torch.allclose(total, torch.ones_like(total), rtol=0, atol=1e-6)
    assert (total[count == 1] == 1).all()  # exactly, where one window covers a pixel
    assert (count > 1).any() == (len(origins) > 1)


def test_a_one_tile_scene_is_exactly_the_padded_tile() -> None:
    """Any model, a tile alone: the same window as :func:`gac.inference.generate.generate` feeds it, the same output."""
    tiles = pattern_s1(3)

    def forward(x: torch.Tensor) -> torch.Tensor:  # deterministic, not an identity, mixes neighbouring pixels
        return (x.roll(1, dims=-1) * 1.7 - x.roll(-3, dims=-2) / 3).repeat(1, 6, 1, 1)

    places = [mosaic.Place(str(i)) for i in range(3)]
    out = mosaic.generate(forward, tiles, places, 224, batch_size=4)
    expected = stage1.geometry.crop_from(forward(stage1.geometry.pad_to(tiles, 224)), 120)
    assert torch.equal(out, expected)


@pytest.mark.numerics
def test_a_2x2_scene_is_the_mask_weighted_sum_of_a_non_identity_models_windows() -> None:
    """Blending, recomputed here window by window: over a 2 x 2 scene, each pixel is Σ mask·output / Σ mask of the
    windows covering it, with TerraTorch's blend mask. The model mixes pixels across the window (a shift, and the
    window's mean), so overlapping windows disagree and any other weighting gives another answer."""
    from terratorch.tasks.tiled_inference import get_blend_mask

    def forward(x: torch.Tensor) -> torch.Tensor:
        return (x.roll(5, dims=-1) * 1.7 - x.roll(-3, dims=-2) / 3 + x.mean((-2, -1), keepdim=True)).repeat(1, 3, 1, 1)

    size, stride, side = 128, 128 - mosaic.OVERLAP, 2 * mosaic.TILE
    tiles = torch.rand(4, 2, mosaic.TILE, mosaic.TILE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    places = [mosaic.Place("scene", r, c, 2, 2) for r in (0, 1) for c in (0, 1)]
    out = mosaic.generate(forward, tiles, places, size, batch_size=4)

    n = -(-(side - size) // stride) + 1  # windows per axis: the fewest that cover the scene
    cover = size + stride * (n - 1)
    margin = (cover - side) // 2
    scene = torch.cat([torch.cat([tiles[0], tiles[1]], -1), torch.cat([tiles[2], tiles[3]], -1)], -2)
    padded = torch.nn.functional.pad(scene[None], (margin, cover - side - margin) * 2, mode="reflect")[0]
    mask = get_blend_mask(size, stride, size, stride).double()
    weighted, uniform = torch.zeros(6, cover, cover, dtype=torch.float64), torch.zeros(6, cover, cover).double()
    mass, count = torch.zeros(cover, cover, dtype=torch.float64), torch.zeros(cover, cover, dtype=torch.float64)
    for y in range(0, n * stride, stride):
        for x in range(0, n * stride, stride):
            window = forward(padded[None, :, y : y + size, x : x + size])[0]
            weighted[:, y : y + size, x : x + size] += mask * window
            uniform[:, y : y + size, x : x + size] += window
            mass[y : y + size, x : x + size] += mask
            count[y : y + size, x : x + size] += 1

    def cut(blended: torch.Tensor) -> torch.Tensor:
        s = blended[:, margin : margin + side, margin : margin + side]
        return torch.stack([s[:, r * 120 : (r + 1) * 120, c * 120 : (c + 1) * 120] for r in (0, 1) for c in (0, 1)])

    expected = cut(weighted / mass)
    # the blend weights are float32 (TerraTorch's mask), each pixel a sum of at most 4 weighted windows
    tolerance = 16 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=tolerance)
    assert (cut(uniform / count) - expected).abs().max() > 1e3 * tolerance  # the weighting is what is tested


class WindowRecorder(BandTiler):
    """:class:`test_stage1.BandTiler` (an identity to see placement) that also keeps every input window."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[torch.Tensor] = []

    def forward(self, inputs: dict[str, torch.Tensor], timesteps: int) -> dict[str, torch.Tensor]:
        self.windows.extend(inputs["S1GRD"].clone())
        return super().forward(inputs, timesteps)


def test_a_2x2_scene_is_generated_as_one_mosaic_and_cut_back_at_the_exact_pixels(catalog, tmp_path: Path) -> None:
    """The whole stage (engine, scenes, windows, blending, the store) with an identity inside: every tile of a 2 x 2
    scene (and an isolated one) comes back exactly where its asymmetric pattern was, and the windows the model saw
    hold the scene's neighbours, not reflections."""
    cells = [(7, 3), (7, 4), (8, 3), (8, 4)]  # (row, col): top-left, top-right, bottom-left, bottom-right
    index = ShardStore(catalog).index
    rows = pd.concat([index, index.head(1)], ignore_index=True).assign(**on_grid([*cells, (20, 30)]).to_dict("list"))
    s1 = pattern_s1(5)
    write_catalog(tmp_path / "catalog", rows, s1.numpy(), np.zeros((5, 12, 120, 120), np.uint16))
    q = Stage1Params(timesteps=1, img_size=128, batch_size=2, shard_size=2, device="cpu", mosaic=True)
    recorder = WindowRecorder()
    report = stage1.run(q.model_copy(update={"out": str(tmp_path / "opt_v1")}), str(tmp_path / "catalog"), recorder)
    assert (report.processed, report.generated, report.errors) == (5, 5, [])
    ids, opt = read_cache(tmp_path / "opt_v1")
    assert ids == list(rows["patch_id"])
    np.testing.assert_array_equal(opt, stage1.to_dn(s1.repeat(1, 6, 1, 1).numpy()))
    # 240 px of scene in windows of 128 px, 96 px apart: 3 x 3 windows over a 320 px cover (40 px of reflection on
    # each side), 2 per model call, then the isolated tile's one window
    assert [shape[0] for shape in recorder.seen] == [2, 2, 2, 2, 1, 1]
    assert len(recorder.windows) == 10
    assert torch.equal(recorder.windows[-1], stage1.geometry.pad_to(s1[4:], 128)[0])
    window = recorder.windows[1]  # the top middle one: scene columns 56-183, rows -40-87
    assert torch.equal(window[:, 40:128, 64:128], s1[1, :, :88, :64])  # the top-right tile, left of which is its
    assert torch.equal(window[:, 40:128, :64], s1[0, :, :88, 56:])  # neighbour, the top-left tile


# -- the real generator: isolated tiles, resume, ranks ---------------------------------------------------------------
def test_isolated_tiles_give_the_same_bytes_with_mosaic_on_and_off(catalog, p, model, reference, tmp_path) -> None:
    """The synthetic catalog's tiles have no neighbours: ``mosaic: true`` writes the per-tile cache byte for byte."""
    index = ShardStore(catalog).index
    _, places = mosaic.scenes(index)
    assert all(place == mosaic.Place(pid) for pid, place in places.items())
    out = tmp_path / "opt_v1"
    stage1.run(p.model_copy(update={"out": str(out), "mosaic": True}), str(catalog), model=model, progress=False)
    assert_same_cache(out, reference)


@pytest.fixture(scope="module")
def scene_catalog(catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic catalog with its first two tiles moved side by side onto one product's grid (a 1 x 2 scene, the
    first shard); the other two stay isolated (the second shard)."""
    store = ShardStore(catalog)
    rows = store.index.head(N_TILES)
    moved = rows.head(2).assign(**on_grid([(40, 60), (40, 61)]).to_dict("list"))
    rows = pd.concat([moved, rows.iloc[2:]], ignore_index=True)
    root = tmp_path_factory.mktemp("scene") / "catalog"
    return write_catalog(root, rows, store.read("s1", rows), store.read("s2", rows))


@pytest.fixture(scope="module")
def scene_reference(scene_catalog: Path, p, model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process mosaic cache of the scene catalog."""
    out = tmp_path_factory.mktemp("scene-reference") / "opt_v1"
    q = p.model_copy(update={"out": str(out), "mosaic": True})
    report = stage1.run(q, str(scene_catalog), model=model, progress=False)
    assert (report.processed, report.generated, report.errors) == (N_TILES, N_TILES, [])
    return out


def test_a_scene_gets_context_and_isolated_tiles_do_not_change(scene_reference: Path, reference: Path) -> None:
    """Against the per-tile cache of the same S1: the scene's tiles differ (their windows hold the neighbour), the
    isolated tiles (same batch, same seed) are byte for byte the same."""
    ids, opt = read_cache(scene_reference)
    _, per_tile = read_cache(reference)
    assert ids[:2] == [f"{PRODUCT}_60_40", f"{PRODUCT}_61_40"]
    assert not np.array_equal(opt[:2], per_tile[:2])
    np.testing.assert_array_equal(opt[2:], per_tile[2:])


def mosaic_cli(
    stage1_params: Stage1Params, tmp: Path, scene_catalog: Path, empty_mlflow_db: Path
) -> tuple[list[str], Path]:
    """``gac stage1`` arguments (test_stage1's) for the scene catalog with ``mosaic: true``, and the cache folder."""
    out = tmp / "opt_v1"
    params = write_params(tmp, out, cli_params(stage1_params.model_copy(update={"mosaic": True})), empty_mlflow_db)
    return cli(params, scene_catalog, out, tmp / "stage1.json"), out


@pytest.mark.slow
def test_a_killed_mosaic_run_resumes_to_the_uninterrupted_cache(
    scene_catalog, p, scene_reference, empty_mlflow_db, tmp_path
) -> None:
    args, out = mosaic_cli(p, tmp_path, scene_catalog, empty_mlflow_db)
    first_shard_then_kill(args, out / "shards", tmp_path / "killed.log")
    survived = (out / "shards" / "00000" / "opt.npy").stat().st_mtime_ns
    assert not (out / "shards" / "00001").exists(), "the kill must land between shards"
    killpoint.rerun(args)
    assert_same_cache(out, scene_reference)
    assert (out / "shards" / "00000" / "opt.npy").stat().st_mtime_ns == survived  # the scene's shard was kept


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_mosaic_cache(
    scene_catalog, p, scene_reference, empty_mlflow_db, tmp_path
) -> None:
    """Rank 0 generates the scene's shard, rank 1 the isolated tiles': the union is the single process's cache."""
    args, out = mosaic_cli(p, tmp_path, scene_catalog, empty_mlflow_db)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "gac", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_cache(out, scene_reference)
