"""Benchmark: loading tiles from the catalog vs through torchgeo's ``BigEarthNetV2``, side by side in one run.

Why the catalog exists: training reads every tile many times, and reading 14 small GeoTIFFs per tile (with
resampling of the 20 m and 60 m bands) on every read is the bottleneck. This script measures it on the same tiles:

* catalog: open the store, then per tile ``store.array(shard, key)[row]`` for ``s2`` and ``s1`` (memory-mapped),
  copied into float32 tensors the way torchgeo returns them — one tile at a time, as a ``Dataset.__getitem__`` does.
* torchgeo: ``BigEarthNetV2(root, split, bands='all')[i]`` for the same tiles (also reads the reference map and the
  labels; the images-only time of its ``_load_image`` is printed too, so the comparison can be judged without them).

Both run from the page cache (the files were just written or read), so this compares decoding work, not disks. Each
reader is timed ``--repeats`` times and the best run is reported. Usage::

    python benchmarks/catalog_load.py                      # 64 synthetic tiles in a temporary folder
    python benchmarks/catalog_load.py --n-tiles 256
    python benchmarks/catalog_load.py --root /data/BigEarthNet-V2 --max-tiles 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _best(fn: Callable[[], int], repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` (the first also warms the page cache)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(root: Path, out: Path, max_tiles: int | None, workers: int, repeats: int) -> dict[str, float]:
    """Build the catalog of ``root`` into ``out`` and time both readers over its tiles."""
    import torch
    from torchgeo.datasets import BigEarthNetV2

    from gac.config import CatalogParams
    from gac.data import catalog
    from gac.io.store import ShardStore

    start = time.perf_counter()
    report = catalog.build(CatalogParams(out=str(out), max_tiles=max_tiles, workers=workers), root, progress=False)
    build_s = time.perf_counter() - start
    index = ShardStore(out).index
    n = len(index)
    if not n:
        raise SystemExit(f"no tiles in the catalog of {root} ({len(report.rejected)} rejected)")

    # torchgeo datasets per split (its names: 'val' for our 'validation') and each tile's position in them.
    to_torchgeo = {v: k for k, v in BigEarthNetV2.split_map.items()}
    datasets = {s: BigEarthNetV2(root, split=to_torchgeo[s], bands="all") for s in index["split"].unique()}
    position = {s: {p: i for i, p in enumerate(ds.metadata_df["patch_id"])} for s, ds in datasets.items()}
    order = [(datasets[s], position[s][p]) for s, p in zip(index["split"], index["patch_id"], strict=True)]
    rows = list(zip(index["shard"], index["row"], strict=True))

    def load_catalog() -> int:
        store = ShardStore(out)  # fresh: opening the index and the memory maps is part of the cost
        for shard, row in rows:
            s2 = torch.from_numpy(store.array(shard, "s2")[row].astype(np.float32))
            s1 = torch.from_numpy(store.array(shard, "s1")[row].astype(np.float32))
            assert s2.shape == (12, 120, 120) and s1.shape == (2, 120, 120)
        return n

    def load_torchgeo() -> int:
        for ds, i in order:
            item = ds[i]
            assert item["image_s2"].shape == (12, 120, 120) and item["image_s1"].shape == (2, 120, 120)
        return n

    def load_torchgeo_images() -> int:
        for ds, i in order:
            ds._load_image(i, "s2"), ds._load_image(i, "s1")  # what __getitem__ does minus the map and labels
        return n

    # Same pixels, or the race means nothing: S2 is identical (see tests/test_catalog.py for S1's rounding).
    ds, i = order[0]
    shard, row = rows[0]
    np.testing.assert_array_equal(ds[i]["image_s2"].numpy(), ShardStore(out).array(shard, "s2")[row])

    cat_s = _best(load_catalog, repeats)
    tg_s = _best(load_torchgeo, repeats)
    tg_img_s = _best(load_torchgeo_images, repeats)
    return {
        "tiles": n,
        "rejected": len(report.rejected),
        "build_s": build_s,
        "catalog_tiles_per_s": n / cat_s,
        "torchgeo_tiles_per_s": n / tg_s,
        "torchgeo_images_tiles_per_s": n / tg_img_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-tiles", type=int, default=64, help="synthetic tiles to generate (default %(default)s)")
    parser.add_argument("--root", type=Path, help="an existing BigEarthNet v2 root instead of synthetic tiles")
    parser.add_argument("--max-tiles", type=int, help="with --root: at most this many tiles")
    parser.add_argument("--workers", type=int, default=2, help="catalog build processes (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per reader, best kept (%(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gac-bench-") as tmp:
        root = args.root
        if root is None:
            from gac.data.synthetic import generate

            root = Path(tmp, "synthetic")
            start = time.perf_counter()
            generate(root, args.n_tiles, seed=args.seed)
            print(f"generated {args.n_tiles} synthetic tiles (seed {args.seed}) in {time.perf_counter() - start:.1f} s")
        r = run(root, Path(tmp, "catalog"), args.max_tiles, args.workers, args.repeats)

    print(f"catalog build: {r['tiles']} tiles ({r['rejected']} rejected) in {r['build_s']:.2f} s "
          f"= {(r['tiles'] + r['rejected']) / r['build_s']:.1f} tiles/s, {args.workers} worker(s)")  # fmt: skip
    print(f"load S2+S1 per tile, best of {args.repeats}:")
    print(f"  catalog (ShardStore memory maps)     {r['catalog_tiles_per_s']:10.1f} tiles/s")
    print(f"  torchgeo BigEarthNetV2.__getitem__   {r['torchgeo_tiles_per_s']:10.1f} tiles/s")
    print(f"  torchgeo _load_image s2+s1 only      {r['torchgeo_images_tiles_per_s']:10.1f} tiles/s")
    ratio = r["catalog_tiles_per_s"] / r["torchgeo_tiles_per_s"]
    ratio_img = r["catalog_tiles_per_s"] / r["torchgeo_images_tiles_per_s"]
    verdict = "met" if ratio >= 10 else "NOT met"
    print(f"speed-up: {ratio:.1f}x vs __getitem__, {ratio_img:.1f}x vs images only (target >= 10x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
