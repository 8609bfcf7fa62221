"""Benchmark: every non-model step of GAC at N = 1k and 10k tiles, the index-only ones at 550k (BigEarthNet v2).

The models' time is the GPU's and is measured elsewhere (``stage1_throughput.py``, ``train_memory.py``); this measures
the machinery around them — where a quadratic step, a leak of open files or an unbounded buffer would stop a
550k-tile run long before the models matter:

=============================  ========================================================================================
step                           what runs (the project's own code)
=============================  ========================================================================================
catalog: metadata pairing      ``read_metadata`` + ``select`` + the per-tile date/season parsing of a metadata.parquet
dataset construction           ``PairDataModule.setup`` (tile pairing) + ``PairDataset`` (row lookup in both stores)
dataloader epoch (shuffled)    one shuffled epoch of the training ``DataLoader`` (2 workers, batch 16): every tile read
cache write (identity model)   :func:`gac.inference.engine.run` with an *identity stand-in* for the model (labelled as
such: it
                               measures the engine — shards, fingerprint, atomic writes — not a network)
cache read                     every tile of that cache, in order, and its content digest
evaluation aggregation         ``summarise`` + ``group_tables`` over the ablation rows of every tile
mlflow step logging            one ``log_batch`` of 5 metrics per training step of an epoch (N/16 steps), SQLite store
=============================  ========================================================================================

The stores at N tiles are written with the project's own :class:`~gac.io.store.ShardStore` from real synthetic tiles
(``gac synth`` GeoTIFFs, read by the catalog's reader) repeated under new ids; decoding those GeoTIFFs is reported
apart, as tiles/s per core, since it is the storage's and the CPU's. Index-only steps also run at 550k rows.
Each step runs in a fresh process (imports done before the clock starts): seconds, peak RSS of it and its workers
(memory-mapped pages it touched count too), and the most open files seen (sampled every 5 ms).

Usage::

    python benchmarks/scale.py                       # 1k and 10k tiles (≈ 13 GB of scratch), 550k index-only
    python benchmarks/scale.py --sizes 200 2000      # a quicker look

The last line reads ``scale: worst growth <G>x for 10x tiles, max open files <F>, machinery hours at 550k <H>``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REAL = 549_488  # BigEarthNet v2 (reBEN) patches
STAGES = ("stage1", "stage2", "stage3")
INDEX_ONLY = ("catalog: metadata pairing", "dataset construction", "evaluation aggregation")


# -- data ------------------------------------------------------------------------------------------------------------
def metadata(n: int, seed_meta):
    """A metadata.parquet frame of ``n`` rows in BigEarthNet v2's schema (ids unique, splits 60/20/20)."""
    import numpy as np

    rows = seed_meta.iloc[np.arange(n) % len(seed_meta)].reset_index(drop=True).copy()
    suffix = [f"_{i:07d}" for i in range(n)]
    rows["patch_id"] = rows["patch_id"].str.rsplit("_", n=1).str[0] + suffix  # the date part stays parseable
    rows["s1_name"] = rows["s1_name"] + suffix
    rows["split"] = np.where(np.arange(n) % 5 < 3, "train", np.where(np.arange(n) % 5 == 3, "validation", "test"))
    return rows


def write_stores(folder: Path, n: int, catalog_seed: Path) -> dict[str, Path]:
    """Catalog and opt_v1 stores of ``n`` tiles (shards of 256), repeated from the seed catalog's real tiles."""
    import numpy as np

    from gac.io.store import ShardStore

    seed = ShardStore(catalog_seed)
    rows = seed.index.drop(columns=["shard", "row"])
    s1, s2 = seed.read("s1"), seed.read("s2")
    catalog, opt_v1 = ShardStore(folder / "catalog"), ShardStore(folder / "opt_v1")
    for start in range(0, n, 256):
        take = np.arange(start, min(start + 256, n)) % len(rows)
        meta = rows.iloc[take].reset_index(drop=True)
        meta["patch_id"] = [f"t{i:07d}" for i in range(start, start + len(take))]
        meta["split"] = np.where(np.arange(start, start + len(take)) % 5 < 3, "train", "validation")
        name = f"{start // 256:05d}"
        catalog.write_shard(name, meta, {"s1": s1[take], "s2": s2[take]})
        opt_v1.write_shard(name, meta, {"opt": s2[take] // 2 + 100})
    catalog.finalize()
    opt_v1.finalize()
    return {"catalog": catalog.root, "opt_v1": opt_v1.root}


def index_store(folder: Path, n: int) -> Path:
    """A store holding only an index of ``n`` tiles (the index-only steps at 550k need no pixels)."""
    import numpy as np
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"t{i:07d}" for i in range(n)]
    split = np.where(np.arange(n) % 5 < 3, "train", np.where(np.arange(n) % 5 == 3, "validation", "test"))
    pd.DataFrame({"patch_id": ids, "split": split, "shard": [f"{i // 256:05d}" for i in range(n)],
                  "row": np.arange(n) % 256}).to_parquet(folder / "index.parquet", index=False)  # fmt: skip
    return folder


# -- steps (each runs in a fresh process) ----------------------------------------------------------------------------
def step_metadata(work: Path, n: int, index_only: bool = True) -> None:
    from gac.data import layout
    from gac.data import metadata as reben

    meta = metadata(n, __import__("pandas").read_parquet(work / "seed" / layout.METADATA_FILE))
    root = work / f"meta{n}"
    root.mkdir(exist_ok=True)
    meta.to_parquet(root / layout.METADATA_FILE, index=False)
    selected = reben.select(reben.read_metadata(root), ["train", "validation", "test"], None)
    assert len({reben.acquisition(p) for p in selected["patch_id"]}) > 0


def step_dataset(work: Path, n: int, index_only: bool = False) -> None:
    from gac.training.data import PairDataset
    from gac.training.datamodule import PairDataModule

    cat = str(index_store(work / f"index{n}", n)) if index_only else str(work / f"n{n}" / "catalog")
    src = cat if index_only else str(work / f"n{n}" / "opt_v1")
    data = PairDataModule(cat, src, batch_size=16)
    data.setup("fit")
    PairDataset(cat, src, data.train_ids)


def step_dataloader(work: Path, n: int) -> None:
    import torch

    from gac.training.datamodule import PairDataModule

    data = PairDataModule(str(work / f"n{n}" / "catalog"), str(work / f"n{n}" / "opt_v1"), 16, num_workers=2)
    data.setup("fit")
    loader = torch.utils.data.DataLoader(data.train_dataloader().dataset, batch_size=16, shuffle=True, num_workers=2)
    assert sum(len(b["patch_id"]) for b in loader) == len(data.train_ids)


def step_cache_write(work: Path, n: int) -> None:
    import torch

    from gac.inference import engine
    from gac.inference.refine import work_index

    class Identity(torch.nn.Module):  # the stand-in: this benchmark measures the engine, not a network
        def forward(self, x):
            return x

    root = work / f"n{n}"
    engine.run(out=root / "cache", stamp={"bench": n}, catalog_root=str(root / "catalog"),
               index=work_index(str(root / "catalog"), str(root / "opt_v1")), step=lambda m, s1, opt, _ids: m(opt),
               model=Identity(), shard_size=256, batch_size=32, device=torch.device("cpu"),
               source_root=str(root / "opt_v1"), progress=False)  # fmt: skip


def step_cache_read(work: Path, n: int) -> None:
    from gac.io.store import ShardStore

    store = ShardStore(work / f"n{n}" / "cache")
    index = store.index
    total = sum(len(store.read("opt", index.iloc[i : i + 256])) for i in range(0, len(index), 256))
    assert total == n
    store.content_digest()


def step_aggregation(work: Path, n: int, index_only: bool = False) -> None:
    import numpy as np
    import pandas as pd

    from gac.evaluation import ablation as evaluate

    rng = np.random.default_rng(0)
    rows = pd.DataFrame(
        {
            "patch_id": [f"t{i:07d}" for i in range(n)],
            "split": "test",
            "country": rng.choice(["AT", "FI", "PT", "IE"], n),
            "season": rng.choice(["DJF", "JJA"], n),
        }
    )
    per_tile = pd.concat([rows.assign(row=row, **{m: rng.random(n) for m in ("psnr", "ssim", "sam_deg", "sar_edge")})
                          for row in evaluate.ROWS], ignore_index=True)  # fmt: skip
    names = ["psnr", "ssim", "sam_deg", "sar_edge"]
    evaluate.summarise(per_tile, names)
    evaluate.group_tables(per_tile, names)


def step_mlflow(work: Path, n: int) -> None:
    import mlflow
    from mlflow.entities import Metric

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow-{n}.db")
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment(f"bench-{n}-{time.time_ns()}"))
    now = int(time.time() * 1000)
    for step in range(n // 16):
        metrics = [Metric(k, 0.1, now, step) for k in ("train/loss", "train/l1", "train/ms_ssim", "lr", "epoch")]
        client.log_batch(run.info.run_id, metrics=metrics)


STEPS = {
    "catalog: metadata pairing": step_metadata,
    "dataset construction": step_dataset,
    "dataloader epoch (shuffled)": step_dataloader,
    "cache write (identity model)": step_cache_write,
    "cache read": step_cache_read,
    "evaluation aggregation": step_aggregation,
    "mlflow step logging": step_mlflow,
}


def _measured(name: str, work: str, n: int, index_only: bool) -> tuple[float, float, int]:
    """Run one step in this (fresh) process: seconds, peak RSS MB (with workers), max open files (with workers)."""
    import resource

    import psutil

    me, peak_files, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                procs = [me, *me.children(recursive=True)]
                peak_files[0] = max(peak_files[0], sum(p.num_fds() for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.005)

    import mlflow  # noqa: F401

    import gac.data.catalog  # noqa: F401 - imports are the process's start-up, not the step: done before the clock
    import gac.evaluation.ablation  # noqa: F401
    import gac.inference.engine  # noqa: F401
    import gac.inference.refine  # noqa: F401
    import gac.training.data  # noqa: F401

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    kwargs = {"index_only": True} if index_only else {}
    start = time.perf_counter()
    STEPS[name](Path(work), n, **kwargs)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    usage = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    rss = max(usage)
    return seconds, rss / 1024, peak_files[0]


def measure(name: str, work: Path, n: int, index_only: bool = False) -> tuple[float, float, int]:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measured, name, str(work), n, index_only).result()


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (what it costs on disk, indexes and digests included)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def geotiff_rate(work: Path) -> float:
    """Tiles per second per core of the catalog's GeoTIFF reader (14 files per tile, 20/60 m bands resampled)."""
    from gac.data import catalog
    from gac.data.metadata import read_metadata

    meta = read_metadata(work / "seed")
    start = time.perf_counter()
    for rec in meta.to_dict("records"):
        catalog.read_tile(work / "seed", rec["patch_id"], rec["s1_name"])
    return len(meta) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--index-size", type=int, default=REAL)
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    small, large = args.sizes
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gac-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from gac.config import CatalogParams
        from gac.data import catalog, synthetic

        synthetic.generate(work / "seed", n_tiles=64, seed=0)
        catalog.build(CatalogParams(out=str(work / "seed_catalog"), workers=0), work / "seed", progress=False)
        rate = geotiff_rate(work)
        results: dict[str, dict[int, tuple[float, float, int]]] = {}
        disk: dict[str, float] = {}
        for n in (small, large):
            write_stores(work / f"n{n}", n, work / "seed_catalog")
            for name in STEPS:
                results.setdefault(name, {})[n] = measure(name, work, n)
            disk = {store: folder_bytes(work / f"n{n}" / store) / n for store in ("catalog", "opt_v1")}
            shutil.rmtree(work / f"n{n}")
        for store, per_tile in disk.items():
            gb = per_tile * REAL / 1e9
            print(f"disk: {store:8s} {per_tile / 1024:7.1f} KiB/tile -> {gb:6.1f} GB at {REAL:,} tiles")
        for name in INDEX_ONLY:
            results[name][args.index_size] = measure(name, work, args.index_size, index_only=True)
        return report(results, small, large, args.index_size, rate)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def report(results: dict, small: int, large: int, big: int, rate: float) -> int:
    header = f"{'step':30s} {'N':>8s} {'seconds':>9s} {'peak RSS MB':>12s} {'open files':>11s}"
    print(header)
    worst, files, hours = 0.0, 0, 0.0
    for name, by_n in results.items():
        for n, (sec, rss, fds) in sorted(by_n.items()):
            print(f"{name:30s} {n:8d} {sec:9.3f} {rss:12.0f} {fds:11d}")
            files = max(files, fds)
        growth = by_n[large][0] / max(by_n[small][0], 1e-9)
        worst = max(worst, growth)
        if big in by_n:  # measured at full size
            at_real = by_n[big][0] * REAL / big
        else:  # extrapolated from 10k with the exponent the 1k → 10k growth shows (linear or worse, never better)
            exponent = max(1.0, math.log10(max(growth, 1e-9)) / math.log10(large / small))
            at_real = by_n[large][0] * (REAL / large) ** exponent
        hours += at_real / 3600
        print(f"{'':30s} growth {large // small}x tiles: {growth:5.2f}x; at {REAL:,} tiles: {at_real / 3600:7.3f} h")
    cores = os.cpu_count()
    print(
        f"GeoTIFF decoding (reported apart): {rate:.1f} tiles/s per core -> {REAL / rate / 3600:.1f} core-hours "
        f"for {REAL:,} tiles ({REAL / rate / 3600 / cores:.1f} h on this machine's {cores} cores)"
    )
    print(
        f"scale: worst growth {worst:.1f}x for 10x tiles, max open files {files}, machinery hours at 550k {hours:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
