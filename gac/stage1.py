"""Stage 1: generate opt_v1 for every catalog tile with TerraMind (S1GRD → S2L2A), resumably and sharded.

The opt_v1 cache is a :class:`~gac.store.ShardStore` with one array, ``opt`` ``(N, 12, 120, 120) uint16`` (S2L2A DN),
and the catalog's per-tile metadata (CRS, transform, split, …) in its index, so Stage 2/3 and the GeoTIFF export read it
without going back to the catalog.

* **Resumable.** Work is cut into fixed shards of catalog rows; a shard is written atomically when all its tiles are
  done. After a kill, a rerun generates only the shards that are missing. A ``stage1.json`` fingerprint of everything
  that determines the output (model, weights, timesteps, size, seed, shard and batch size, catalog tiles) guards
  against resuming with other settings: if it differs, the cache is rebuilt from scratch.
* **Reproducible.** Each batch seeds Python's and torch's RNGs from ``seed`` and the batch's position, so a tile's
  opt_v1 does not depend on how many processes ran or which ran first. Bit for bit only at the same intra-op thread
  count per process: CPU kernels sum in a thread-dependent order, which moves ~0.05 % of the DN by ±1 (``torchrun``
  gives each rank ``OMP_NUM_THREADS=1``; a plain run uses all cores).
* **Distributed.** Under ``torchrun --nproc-per-node K`` (``RANK``/``WORLD_SIZE``) shard *i* goes to rank *i mod K*;
  rank 0 waits for the others (a gloo/nccl barrier), writes the index and logs the MLflow run.
* **Robust.** A tile with non-finite SAR or a non-finite generation is recorded in its shard's ``rejected.parquet``
  with the reason; a batch that raises is retried tile by tile so one bad tile cannot take its neighbours down.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gac import geometry
from gac.atomic import write_text
from gac.config import Stage1Params
from gac.errors import GacError
from gac.store import SHARDS, ShardStore

CONFIG_FILE = "stage1.json"
DN_MAX = 65535.0


@dataclass
class Stage1Report:
    """What one Stage 1 execution did (on this rank, or in total on rank 0 after :func:`run`)."""

    processed: int = 0
    total: int = 0
    generated: int = 0
    skipped: int = 0
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    #: Time spent generating and writing tiles (no import or model build): what ``tiles_per_s`` measures.
    work_seconds: float = 0.0
    out: str = ""

    @property
    def tiles_per_s(self) -> float:
        return self.generated / self.work_seconds if self.work_seconds > 0 else 0.0

    def summary_line(self) -> str:
        """The seed's summary line."""
        return f"Processed {self.processed}/{self.total} tiles, Errors {len(self.errors)}, Output dir {self.out}"


def resolve_device(name: str) -> torch.device:
    """``auto`` → the local CUDA device of this rank when there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """Autocast to ``stage1.precision`` (``32``: none); :func:`check_precision` has vetted the pair beforehand."""
    import contextlib

    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware (CUDA Ampere+, or a CPU with AVX512-BF16 or AMX).

    Why it matters: without it oneDNN emulates bf16 and TerraMind's diffusion decoder runs ~150x slower than in fp32
    (measured on this project's 2-core AVX2 machines), so bf16 there is a mistake, not a speed-up.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse, in one line and before any model is built, a precision ``device`` has no fast path for."""
    native = {"32": True, "bf16": native_bf16(device), "16": device.type == "cuda"}
    if native[precision]:
        return
    need = "AVX512-BF16 or AMX on a CPU, or a bf16-capable GPU" if precision == "bf16" else "a CUDA device"
    raise GacError(f"stage1.precision: {precision!r} on {device} has no native support here (needs {need}); use '32'")


def seed_batch(seed: int, shard: str, batch: int) -> None:
    """Seed every RNG the sampler touches from the batch's identity (not from the process that runs it)."""
    digest = hashlib.sha256(f"{seed}/{shard}/{batch}".encode()).digest()
    value = int.from_bytes(digest[:4], "little")
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def generate(model: torch.nn.Module, s1_db: torch.Tensor, p: Stage1Params, device: torch.device) -> torch.Tensor:
    """Generate S2L2A DN (B, 12, 120, 120) float32 for S1 dB (B, 2, 120, 120), exactly aligned with the input."""
    size = s1_db.shape[-1]
    x = geometry.pad_to(s1_db.to(device, non_blocking=True), p.img_size)
    with torch.inference_mode(), autocast(device, p.precision):
        out = model({"S1GRD": x}, timesteps=p.timesteps)["S2L2A"]
    return geometry.crop_from(out.float(), size).cpu()


def to_dn(opt: np.ndarray) -> np.ndarray:
    """Round generated DN to the uint16 L2A range."""
    return np.clip(np.rint(opt), 0, DN_MAX).astype(np.uint16)


def fingerprint(p: Stage1Params, catalog_ids: list[str]) -> dict:
    """Everything that determines opt_v1; a cache written under another fingerprint is not resumed."""
    def file_sha(path: str) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else "?"

    weights = "random"
    if p.ckpt_path:
        weights = file_sha(p.ckpt_path)
    elif p.pretrained:
        weights = "hub"
    if p.tokenizer_ckpt_path:
        weights += f"+tokenizer:{file_sha(p.tokenizer_ckpt_path)}"
    keys = ("variant", "timesteps", "img_size", "seed", "shard_size", "batch_size", "precision")
    ident = {k: getattr(p, k) for k in keys} | {"weights": weights}
    ident["tiles"] = hashlib.sha256("\n".join(catalog_ids).encode()).hexdigest()
    return ident


def plan(index: pd.DataFrame, shard_size: int) -> list[tuple[str, pd.DataFrame]]:
    """Cut the catalog rows into the fixed, named shards every rank agrees on."""
    return [(f"{i // shard_size:05d}", index.iloc[i : i + shard_size]) for i in range(0, len(index), shard_size)]


def _dist() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int, device: torch.device) -> None:
    """Wait for every rank (only under torchrun); the process group is made on first use."""
    if world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dist.barrier()


class _Batches(torch.utils.data.IterableDataset):
    """Yields ``(shard, batch_no, rows, s1)`` for the shards of this rank; runs in DataLoader workers to overlap I/O."""

    def __init__(self, catalog_root: str, shards: list[tuple[str, pd.DataFrame]], batch_size: int) -> None:
        self.catalog_root, self.shards, self.batch_size = catalog_root, shards, batch_size

    def __iter__(self) -> Iterator[tuple[str, int, pd.DataFrame, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        store = ShardStore(self.catalog_root)
        for k, (name, rows) in enumerate(self.shards):
            if info is not None and k % info.num_workers != info.id:
                continue
            for b, start in enumerate(range(0, len(rows), self.batch_size)):
                chunk = rows.iloc[start : start + self.batch_size]
                yield name, b, chunk, torch.from_numpy(store.read("s1", chunk))


def _generate_rows(model, s1: torch.Tensor, rows: pd.DataFrame, p, device) -> tuple[list[int], np.ndarray, list]:
    """Generate one batch; return kept row positions, their uint16 DN, and ``{patch_id, reason}`` failures."""
    errors, ok = [], []
    for i, pid in enumerate(rows["patch_id"]):
        if torch.isfinite(s1[i]).all():
            ok.append(i)
        else:
            errors.append({"patch_id": pid, "reason": "non-finite SAR input (expected finite dB)"})
    if not ok:
        return [], np.empty((0, 12, s1.shape[-2], s1.shape[-1]), np.uint16), errors
    try:
        outs = [generate(model, s1[ok], p, device)]
        groups = [ok]
    except Exception:  # isolate the tile that breaks the batch
        outs, groups = [], []
        for i in ok:
            try:
                outs.append(generate(model, s1[i : i + 1], p, device))
                groups.append([i])
            except Exception as e:
                errors.append({"patch_id": rows["patch_id"].iloc[i], "reason": f"generation failed: {e!r}"[:300]})
    kept, arrays = [], []
    for group, out in zip(groups, outs, strict=True):
        for j, i in enumerate(group):
            if torch.isfinite(out[j]).all():
                kept.append(i)
                arrays.append(to_dn(out[j].numpy()))
            else:
                errors.append({"patch_id": rows["patch_id"].iloc[i], "reason": "non-finite generated output"})
    return kept, np.stack(arrays) if arrays else np.empty((0, 12, *s1.shape[-2:]), np.uint16), errors


def run(
    p: Stage1Params, catalog_root: str, model: torch.nn.Module | None = None, progress: bool = True
) -> Stage1Report:
    """Generate the missing shards of opt_v1 for this rank; on rank 0 also finalise the cache index."""
    from tqdm import tqdm

    start = time.perf_counter()
    rank, world = _dist()
    device = resolve_device(p.device)
    check_precision(device, p.precision)
    catalog = ShardStore(catalog_root)
    index = catalog.index
    if p.max_tiles is not None:
        index = index.head(p.max_tiles)
    if index.empty:
        raise GacError(f"{catalog_root}: the catalog has no tiles (run the catalog stage first)")
    out = Path(p.out)
    stamp = fingerprint(p, list(index["patch_id"]))
    config = out / CONFIG_FILE
    if rank == 0:
        if out.exists() and (not config.is_file() or json.loads(config.read_text()) != stamp):
            shutil.rmtree(out)  # made with other settings: resuming would mix two different caches.
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob(".tmp-*"), *(out / SHARDS).glob(".tmp-*")]:  # left by a writer that was killed
            shutil.rmtree(stale, ignore_errors=True)
        write_text(config, json.dumps(stamp, indent=2))
    _barrier(world, device)
    store = ShardStore(out)
    shards = plan(index.reset_index(drop=True), p.shard_size)
    done = set(store.shard_names())
    mine = [(n, r) for k, (n, r) in enumerate(shards) if k % world == rank and n not in done]
    report = Stage1Report(total=len(index), out=str(out), skipped=sum(len(r) for n, r in shards if n in done))
    if mine and model is None:
        torch.manual_seed(p.seed)
        from gac.models.terramind import build_generator

        model = build_generator(p)
    if mine:
        model.to(device)
    pending: dict[str, dict] = {n: {"rows": r, "left": -(-len(r) // p.batch_size), "parts": {}} for n, r in mine}
    batches = _Batches(catalog_root, mine, p.batch_size)
    loader = torch.utils.data.DataLoader(  # pinned host memory lets the non_blocking copy in generate() overlap
        batches,
        batch_size=None,
        num_workers=p.num_workers,
        prefetch_factor=2 if p.num_workers else None,
        pin_memory=device.type == "cuda",
    )
    bar = tqdm(total=sum(len(r) for _, r in mine), unit="tile", desc=f"stage1[{rank}]", disable=not progress)
    work_start = time.perf_counter()
    for name, b, rows, s1 in loader:
        seed_batch(p.seed, name, b)
        kept, dn, errors = _generate_rows(model, s1, rows, p, device)
        state = pending[name]
        state["parts"][b] = (rows.iloc[kept], dn, errors)
        state["left"] -= 1
        bar.update(len(rows))
        if state["left"] == 0:
            parts = [state["parts"][k] for k in sorted(state["parts"])]
            meta = pd.concat([r for r, _, _ in parts]).drop(columns=["shard", "row"])
            errs = pd.DataFrame([e for _, _, es in parts for e in es], columns=["patch_id", "reason"])
            store.write_shard(name, meta, {"opt": np.concatenate([a for _, a, _ in parts])}, errs)
            report.generated += len(meta)
            report.errors.extend(errs.to_dict("records"))
            del pending[name]
    bar.close()
    report.work_seconds = time.perf_counter() - work_start
    _barrier(world, device)
    if rank == 0:
        final = store.finalize()
        report.errors = store.rejected().to_dict("records")
        report.processed = len(final) + len(report.errors)
    report.seconds = time.perf_counter() - start
    return report


def export_geotiff(store_root: str | Path, patch_id: str, path: str | Path, key: str = "opt") -> Path:
    """Write one tile of a store (opt_v1/v2/v3) as a 12-band GeoTIFF with the tile's CRS and transform."""
    from gac.geotiff import write_geotiff

    store = ShardStore(store_root)
    rows = store.rows_for([patch_id])
    return write_geotiff(path, store.read(key, rows)[0], rows.iloc[0])
