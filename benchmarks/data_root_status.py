"""Benchmark: what ``dvc status`` costs when the catalog stage depends on a BigEarthNet v2 root outside the repository.

``dvc.yaml`` lists ``${data.root}`` as the catalog stage's dependency, so DVC hashes every file under the root that
``params.yaml`` names (``configs/bigearthnet-gpu.yaml``: ``/data/BigEarthNet-V2``, 549,488 tiles of 15 files each:
12 S2 bands, VV, VH and a reference map, plus ``metadata.parquet``). This measures that hashing at N tiles, in a
throw-away project made from this working tree with ``params.yaml`` = the GPU config, ``data.root`` = a root of N tiles
in a temporary folder outside the project, and the catalog limited to its first 8 tiles (``catalog.max_tiles``: the
stage really runs, but DVC's cost is the dependency's, which is always the whole root).

The root's tiles are ``gac synth`` tiles (seed 0) copied under new ids: every file is its own file on disk with real
GeoTIFF bytes (≈ 350 KB a tile; real reBEN tiles are ≈ 215 KB), no hard links (DVC's state is keyed by inode).

Per N, three timings of the real ``dvc`` commands:

* ``repro``: ``dvc repro catalog`` once (hashes the root, catalogues 8 tiles, writes ``dvc.lock``);
* ``first``: ``dvc status catalog`` with an empty DVC site cache (``DVC_SITE_CACHE_DIR``, where DVC keeps its state
  database): what a fresh clone or machine sees — every file is read and md5-hashed;
* ``again``: ``dvc status catalog`` right after: nothing changed, DVC's state database answers from each file's
  inode, mtime and size (every file is still stat'ed).

The files were just written, so ``first`` reads them from the page cache: on a real disk the first hash of 118 GB
also waits for the disk. The 550k figures are a straight line through the two largest sizes (their per-tile costs
are printed side by side, so whether it is a line shows).

Usage::

    python benchmarks/data_root_status.py                  # 2,500 and 10,000 tiles (≤ 3.2 GB of scratch, ≈ 6 min)
    python benchmarks/data_root_status.py --sizes 20 40    # a quick look

The last line reads ``data root status: <N> tiles first <s> s, again <s> s; 549,488 tiles ≈ first <m> min, again
<m> min``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from rehearse import GPU_CONFIG, make_project  # noqa: E402  (the throw-away project the rehearsal uses)
from scale import REAL, metadata  # noqa: E402  (metadata rows in BigEarthNet v2's schema, ids made unique)

SEED_TILES = 30
CATALOGUED = 8  # catalog.max_tiles: the stage runs on these; DVC hashes the whole root regardless


def outside_root(root: Path, n: int, seeds: Path) -> Path:
    """``n`` tiles in the BigEarthNet v2 layout at ``root``: the tiles of ``seeds`` (a synthetic root) copied in turn
    under new ids, each file a copy of its own, and their ``metadata.parquet``."""
    from gac.data import layout
    from gac.data.metadata import read_metadata

    seed_meta = read_metadata(seeds)
    rows = metadata(n, seed_meta)
    for i, row in rows.iterrows():
        src = seed_meta.iloc[i % len(seed_meta)]
        pairs = [(layout.s2_band_path(seeds, src.patch_id, b), layout.s2_band_path(root, row.patch_id, b))
                 for b in layout.S2_BANDS]  # fmt: skip
        pairs += [(layout.s1_band_path(seeds, src.s1_name, b), layout.s1_band_path(root, row.s1_name, b))
                  for b in layout.S1_BANDS]  # fmt: skip
        pairs.append((layout.reference_map_path(seeds, src.patch_id), layout.reference_map_path(root, row.patch_id)))
        for source, target in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    rows["labels"] = rows["labels"].map(list)
    layout.write_metadata(root / layout.METADATA_FILE, rows.to_dict("records"), {})
    return root


def project(where: Path, root: Path) -> Path:
    """This working tree as a new git + DVC project at ``where`` whose ``params.yaml`` is the GPU config with
    ``data.root`` = ``root`` (as docs/real-world.md applies it) and the catalog on its first tiles, one process."""
    params = yaml.safe_load(GPU_CONFIG.read_text())
    params["data"]["root"] = str(root)
    params["catalog"].update(max_tiles=CATALOGUED, workers=0)
    where.mkdir(parents=True)
    make_project(where, params)
    return where


def dvc(args: list[str], repo: Path, site_cache: Path) -> tuple[float, str]:
    """Seconds and output of ``dvc <args>`` in ``repo`` with DVC's site cache (its state database) at ``site_cache``.
    A failure ends the benchmark."""
    env = os.environ | {"DVC_SITE_CACHE_DIR": str(site_cache), "PYTHONPATH": str(repo), "GAC_PROGRESS": "0",
                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(
            f"data root status: dvc {' '.join(args)} failed in {repo}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return seconds, done.stdout


def measure(repo: Path, scratch: Path) -> dict[str, float]:
    """``repro``, ``first`` and ``again`` seconds (see the module docstring) in ``repo``; each status must find
    nothing to do."""
    figures = {"repro": dvc(["repro", "catalog"], repo, scratch / "site-repro")[0]}
    for name in ("first", "again"):
        figures[name], out = dvc(["status", "--json", "catalog"], repo, scratch / "site-status")
        if json.loads(out or "{}"):
            sys.exit(f"data root status: `dvc status catalog` found changes after `dvc repro`: {out}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000], help="tiles per root (ascending)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    args = parser.parse_args(argv)
    from gac.data.synthetic import generate

    scratch = Path(tempfile.mkdtemp(prefix="gac-data-root-", dir=args.dir))
    rows = {}
    try:
        generate(scratch / "seeds", n_tiles=SEED_TILES, seed=0, workers=1)
        for n in sorted(args.sizes):
            start = time.perf_counter()
            root = outside_root(scratch / f"root-{n}" / "BigEarthNet-V2", n, scratch / "seeds")
            files = sum(1 for p in root.rglob("*") if p.is_file())
            gigabytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e9
            repo = project(scratch / f"project-{n}", root)
            written = time.perf_counter() - start
            rows[n] = measure(repo, scratch / f"dvc-{n}")
            f = rows[n]
            print(f"{n:>7,} tiles  {files:>9,} files  {gigabytes:5.2f} GB (written in {written:4.0f} s)   "
                  f"repro {f['repro']:6.1f} s   first status {f['first']:6.1f} s ({f['first'] / n * 1e3:5.2f} ms/tile, "
                  f"{gigabytes * 1e3 / f['first']:4.0f} MB/s)   again {f['again']:6.1f} s "
                  f"({f['again'] / n * 1e3:5.2f} ms/tile)", flush=True)  # fmt: skip
            shutil.rmtree(root.parent)  # the largest size alone needs the disk
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    big = max(rows)
    small = sorted(rows)[-2] if len(rows) > 1 else None

    def at_real(key: str) -> float:
        """Seconds at 549,488 tiles: the line through the two largest sizes (through 0 with one size), never less
        than the largest size took (at a few tiles the line is start-up noise)."""
        if small is None:
            return rows[big][key] / big * REAL
        slope = (rows[big][key] - rows[small][key]) / (big - small)
        return max(rows[big][key], rows[big][key] + slope * (REAL - big))

    first, again = at_real("first"), at_real("again")
    print(f"at {REAL:,} tiles ({REAL * 15:,} files), a straight line through the sizes above: first status "
          f"≈ {first / 60:.0f} min, every later status or repro ≈ {again / 60:.1f} min")  # fmt: skip
    print(f"data root status: {big:,} tiles first {rows[big]['first']:.1f} s, again {rows[big]['again']:.1f} s; "
          f"{REAL:,} tiles ≈ first {first / 60:.0f} min, again {again / 60:.1f} min")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
