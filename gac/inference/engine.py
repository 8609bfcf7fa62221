"""Apply a model to every tile of a cache: the one sharded, fingerprinted, resumable writer of GAC.

Stage 1 (S1 → opt_v1, :mod:`gac.inference.generate`), Stage 2 and Stage 3 (opt_v1 → opt_v2 → opt_v3,
:mod:`gac.inference.refine`) and
``gac infer`` all write their caches through :func:`run`, so there is one place to make fast and one to test:

* **Resumable.** Work is cut into fixed shards of rows (:func:`plan`); a shard is written atomically once all its tiles
  are done (:class:`~gac.io.store.ShardStore`). After a kill, a rerun computes only the missing shards: a kill loses at
  most the shards in flight. A fingerprint file (``config_file``) of everything that determines the output guards
  against resuming with other settings or inputs: if it differs, the cache is rebuilt from scratch.
* **Reproducible.** Each batch seeds Python's, NumPy's and torch's RNGs from ``seed`` and the batch's identity (shard,
  batch number), so a tile's output does not depend on how many processes ran or which ran first (bit for bit at the
  same intra-op thread count: CPU kernels sum in a thread-dependent order).
* **Distributed.** Under ``torchrun --nproc-per-node K`` (``RANK``/``WORLD_SIZE``) shard *i* goes to rank *i mod K*;
  rank 0 waits for the others (a gloo/nccl barrier) and writes the store's index.
* **Fast where it runs.** DataLoader workers read batches while the model runs (``num_workers``); on CUDA the host
  memory is pinned so the copy to the device overlaps; the ``step`` runs under ``torch.inference_mode`` and the
  autocast of ``precision`` (:func:`autocast`, refused in one line where the device has no native support).
* **Robust.** A tile with non-finite input or output is recorded in its shard's ``rejected.parquet`` with the reason;
  a batch that raises is retried tile by tile so one bad tile cannot take its neighbours down.
* **Bounded.** Nothing per tile is kept beyond the shard in flight; readers keep a small LRU of memory maps
  (:meth:`gac.io.store.ShardStore.array`), so open files do not grow with the number of shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gac.errors import GacError
from gac.io import fingerprint
from gac.io.atomic import write_text
from gac.io.lock import exclusive
from gac.io.store import ShardStore

DN_MAX = 65535.0
#: Columns of a work index that locate a tile's inputs: catalog shard/row and (for refine stages) source shard/row.
LOCATORS = ("shard", "row", "src_shard", "src_row")

#: ``step(model, s1_db, opt_dn, patch_ids)`` → S2L2A DN (B, 12, 120, 120) float: what a stage computes for one batch.
#: ``s1_db`` (B, 2, 120, 120) and ``opt_dn`` (B, 12, 120, 120, or ``None`` for Stage 1) arrive on the CPU, pinned on
#: CUDA; ``patch_ids`` name the tiles (a cross-fitted Stage 2 picks each tile's model by it). A step may instead
#: return ``{key: DN}``, every value of that shape: each key becomes an array of the cache, e.g. ``{"opt": mean,
#: "sigma": σ}`` (:data:`SIGMA`); a plain tensor is ``{"opt": tensor}``.
Step = Callable[
    [torch.nn.Module, torch.Tensor, torch.Tensor | None, list[str]], torch.Tensor | Mapping[str, torch.Tensor]
]
#: Cache key of the optical's per-pixel, per-band σ, beside ``opt`` and in its DN encoding (reflectance × DN_SCALE,
#: rounded to uint16): a calibrated standard deviation of the reflectance ``opt`` holds the mean of.
SIGMA = "sigma"


@dataclass
class Report:
    """What one execution did (on this rank, or in total on rank 0 after :func:`run`)."""

    processed: int = 0
    total: int = 0
    generated: int = 0
    skipped: int = 0
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    #: Time spent computing and writing tiles (no import or model build): what ``tiles_per_s`` measures.
    work_seconds: float = 0.0
    out: str = ""

    @property
    def tiles_per_s(self) -> float:
        return self.generated / self.work_seconds if self.work_seconds > 0 else 0.0

    def summary_line(self) -> str:
        """The seed's summary line."""
        return f"Processed {self.processed}/{self.total} tiles, Errors {len(self.errors)}, Output dir {self.out}"


# -- devices and precision -------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` → the local CUDA device of this rank when there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """Autocast to ``precision`` (``32``: none); :func:`check_precision` has vetted the pair beforehand."""
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


def resolve_precision(device: torch.device, precision: str) -> tuple[str, str]:
    """``precision``, with ``auto`` made ``bf16`` where ``device`` multiplies bf16 in hardware and ``32`` elsewhere;
    and why, in words (printed by the stage and kept in the cache's provenance)."""
    if precision != "auto":
        return precision, "set in params"
    if not native_bf16(device):
        return "32", f"auto: {device.type} without native bf16 (needs AMX or AVX512-BF16 on a CPU, or a bf16 GPU)"
    if device.type == "cuda":
        return "bf16", f"auto: {torch.cuda.get_device_name(device)} computes bf16"
    isa = "AMX" if torch.cpu._is_amx_tile_supported() else "AVX512-BF16"
    return "bf16", f"auto: the CPU has {isa}"


def check_precision(device: torch.device, precision: str, key: str = "stage1.precision") -> None:
    """Refuse, in one line and before any model is built, a precision ``device`` has no fast path for."""
    native = {"32": True, "bf16": native_bf16(device), "16": device.type == "cuda"}
    if native[precision]:
        return
    need = "AVX512-BF16 or AMX on a CPU, or a bf16-capable GPU" if precision == "bf16" else "a CUDA device"
    raise GacError(f"{key}: {precision!r} on {device} has no native support here (needs {need}); use '32'")


# -- work ------------------------------------------------------------------------------------------------------------
def seed_batch(seed: int, shard: str, batch: int) -> None:
    """Seed every RNG a sampler touches from the batch's identity (not from the process that runs it)."""
    digest = hashlib.sha256(f"{seed}/{shard}/{batch}".encode()).digest()
    value = int.from_bytes(digest[:4], "little")
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def to_dn(opt: np.ndarray) -> np.ndarray:
    """Round DN to the uint16 L2A range."""
    return np.clip(np.rint(opt), 0, DN_MAX).astype(np.uint16)


def cuts(rows: pd.DataFrame, size: int, group: str | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` positions cutting ``rows`` into runs of at most ``size`` rows.

    With ``group``, rows that share that column's value (contiguous) are never split: whole groups are packed up to
    ``size`` rows, and a group larger than ``size`` is a run of its own (Stage 1's mosaic must see a scene at once).
    Without it (or with one group per row) the runs are the fixed ``size`` cuts.
    """
    if group is None:
        return [(i, min(i + size, len(rows))) for i in range(0, len(rows), size)]
    keys = rows[group].to_numpy()
    out, start = [], 0
    ends = [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]] + [len(keys)]
    for begin, end in zip([0, *ends[:-1]], ends, strict=True):
        if end - start > size and begin > start:
            out.append((start, begin))
            start = begin
    return out + ([(start, len(keys))] if len(keys) else [])


def plan(index: pd.DataFrame, shard_size: int, group: str | None = None) -> list[tuple[str, pd.DataFrame]]:
    """Cut the work rows into the fixed, named shards every rank agrees on (whole groups: :func:`cuts`)."""
    return [(f"{k:05d}", index.iloc[a:b]) for k, (a, b) in enumerate(cuts(index, shard_size, group))]


def dist() -> tuple[int, int]:
    """``(rank, world size)`` under ``torchrun``; ``(0, 1)`` otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int, device: torch.device) -> None:
    """Wait for every rank (only under torchrun); the process group is made on first use."""
    if world == 1:
        return
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    tdist.barrier()


class _Batches(torch.utils.data.IterableDataset):
    """Yields ``(shard, batch_no, rows, s1, opt)`` for the shards of this rank; runs in DataLoader workers."""

    def __init__(
        self, catalog_root: str, source_root: str | None, shards: list, batch_size: int, group: str | None = None
    ) -> None:
        self.catalog_root, self.source_root = catalog_root, source_root
        self.shards, self.batch_size, self.group = shards, batch_size, group

    def __iter__(self) -> Iterator[tuple[str, int, pd.DataFrame, torch.Tensor, torch.Tensor | None]]:
        info = torch.utils.data.get_worker_info()
        catalog = ShardStore(self.catalog_root)
        source = ShardStore(self.source_root) if self.source_root else None
        for k, (name, rows) in enumerate(self.shards):
            if info is not None and k % info.num_workers != info.id:
                continue
            for b, (start, stop) in enumerate(cuts(rows, self.batch_size, self.group)):
                chunk = rows.iloc[start:stop]
                s1 = torch.from_numpy(catalog.read("s1", chunk).astype(np.float32, copy=False))
                opt = None
                if source is not None:
                    at = chunk[["src_shard", "src_row"]].set_axis(["shard", "row"], axis=1)
                    opt = torch.from_numpy(source.read("opt", at).astype(np.float32))
                yield name, b, chunk, s1, opt


def _outputs(out: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step's result as ``{key: float CPU tensor}``: a plain tensor is the cache's ``opt``."""
    return {k: v.float().cpu() for k, v in (out.items() if isinstance(out, Mapping) else [("opt", out)])}


def _apply_rows(model, step: Step, s1, opt, rows: pd.DataFrame) -> tuple[list[int], dict[str, np.ndarray], list[dict]]:
    """One batch: return kept row positions, their uint16 DN per cache key, and ``{patch_id, reason}`` failures."""
    errors, ok = [], []
    for i, pid in enumerate(rows["patch_id"]):
        if not torch.isfinite(s1[i]).all():
            errors.append({"patch_id": pid, "reason": "non-finite SAR input (expected finite dB)"})
        elif opt is not None and not torch.isfinite(opt[i]).all():
            errors.append({"patch_id": pid, "reason": "non-finite optical input"})
        else:
            ok.append(i)
    empty = {"opt": np.empty((0, 12, *s1.shape[-2:]), np.uint16)}
    if not ok:
        return [], empty, errors

    def call(idx: list[int]) -> dict[str, torch.Tensor]:
        ids = [rows["patch_id"].iloc[i] for i in idx]
        return _outputs(step(model, s1[idx], None if opt is None else opt[idx], ids))

    try:
        outs, groups = [call(ok)], [ok]
    except Exception:  # isolate the tile that breaks the batch
        outs, groups = [], []
        for i in ok:
            try:
                outs.append(call([i]))
                groups.append([i])
            except Exception as e:
                errors.append({"patch_id": rows["patch_id"].iloc[i], "reason": f"model failed: {e!r}"[:300]})
    kept, arrays = [], {}
    for group, out in zip(groups, outs, strict=True):
        for j, i in enumerate(group):
            if all(torch.isfinite(v[j]).all() for v in out.values()):
                kept.append(i)
                for key, value in out.items():
                    arrays.setdefault(key, []).append(to_dn(value[j].numpy()))
            else:
                errors.append({"patch_id": rows["patch_id"].iloc[i], "reason": "non-finite model output"})
    return kept, {k: np.stack(v) for k, v in arrays.items()} if arrays else empty, errors


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A shard's arrays from its batches' ``{key: DN}``; a batch that kept no tile has only an empty ``opt``."""
    keys = dict.fromkeys(k for part in parts for k in part)
    return {k: np.concatenate([part[k] for part in parts if k in part]) for k in keys}


def run(
    *,
    out: str | Path,
    stamp: dict,
    catalog_root: str,
    index: pd.DataFrame,
    step: Step,
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    shard_size: int,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    seed: int = 0,
    source_root: str | None = None,
    config_file: str = "cache.json",
    progress: bool = True,
    label: str = "cache",
    ranks: tuple[int, int] | None = None,
    group: str | None = None,
) -> Report:
    """Compute the missing shards of the cache at ``out`` for this rank; on rank 0 also finalise its index.

    Args:
        stamp: the fingerprint of everything that determines the output (JSON-able; no paths, no timings).
        index: the work rows, in output order: the tiles' metadata plus their catalog ``shard``/``row`` and, with
            ``source_root``, their source ``src_shard``/``src_row``.
        model: the model, or a function that builds it (called only if there is work left).
        ranks: ``(rank, world size)``; default :func:`dist` (``torchrun``'s). ``(0, 1)`` writes everything in this
            process (e.g. rank 0 after a DDP training, whose other ranks have ended).
        group: a column of ``index`` whose equal (contiguous) values are never split across shards or batches
            (:func:`cuts`): Stage 1's mosaic scenes. It is not written into the store's index.
    """
    rank, world = ranks or dist()
    # One writer per cache: a second run on the same folder would resume "the" cache with its own settings and mix
    # two caches under one fingerprint. Ranks of one torchrun job share the folder on purpose: rank 0 holds the lock.
    with exclusive(out) if rank == 0 else contextlib.nullcontext():
        report = _run_locked(out=Path(out), stamp=stamp, catalog_root=catalog_root, index=index, step=step,
                             model=model, shard_size=shard_size, batch_size=batch_size, device=device,
                             num_workers=num_workers, seed=seed, source_root=source_root, config_file=config_file,
                             progress=progress, label=label, rank=rank, world=world, group=group)  # fmt: skip
        if rank == 0 and report.processed and report.processed == len(report.errors):
            # Nothing usable: a rerun must try again (e.g. with a fixed img_size), not resume "finished" empty shards.
            shutil.rmtree(out, ignore_errors=True)
            first = report.errors[0]
            raise GacError(f"{out}: all {report.processed} tiles failed, nothing kept "
                           f"(first: {first['patch_id']}: {first['reason']})")  # fmt: skip
    return report


def _run_locked(*, out: Path, stamp: dict, catalog_root: str, index: pd.DataFrame, step: Step, model, shard_size: int,
                batch_size: int, device: torch.device, num_workers: int, seed: int, source_root: str | None,
                config_file: str, progress: bool, label: str, rank: int, world: int,
                group: str | None = None) -> Report:  # fmt: skip
    """:func:`run`'s work, under the output folder's lock on rank 0."""
    from tqdm import tqdm

    start = time.perf_counter()
    config = out / config_file
    if rank == 0:
        if out.exists() and (not config.is_file() or fingerprint.read(config) != stamp):
            shutil.rmtree(out)  # made with other settings or inputs: resuming would mix two different caches.
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-*"):  # left by a writer that was killed (shards' are cleaned below)
            shutil.rmtree(stale, ignore_errors=True)
        ShardStore(out).clean_partial()
        write_text(config, json.dumps(stamp, indent=2))
    _barrier(world, device)
    store = ShardStore(out)
    shards = plan(index.reset_index(drop=True), shard_size, group)
    done = set(store.shard_names())
    mine = [(n, r) for k, (n, r) in enumerate(shards) if k % world == rank and n not in done]
    report = Report(total=len(index), out=str(out), skipped=sum(len(r) for n, r in shards if n in done))
    if mine:
        model = (model() if not isinstance(model, torch.nn.Module) else model).to(device)
    pending = {n: {"left": len(cuts(r, batch_size, group)), "parts": {}} for n, r in mine}
    loader = torch.utils.data.DataLoader(  # pinned host memory lets the non_blocking copy to the device overlap
        _Batches(catalog_root, source_root, mine, batch_size, group),
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        pin_memory=device.type == "cuda",
    )
    bar = tqdm(total=sum(len(r) for _, r in mine), unit="tile", desc=f"{label}[{rank}]", disable=not progress)
    work_start = time.perf_counter()
    for name, b, rows, s1, opt in loader:
        seed_batch(seed, name, b)
        kept, dn, errors = _apply_rows(model, step, s1, opt, rows)
        state = pending[name]
        state["parts"][b] = (rows.iloc[kept], dn, errors)
        state["left"] -= 1
        bar.update(len(rows))
        if state["left"] == 0:
            parts = [state["parts"][k] for k in sorted(state["parts"])]
            meta = pd.concat([r for r, _, _ in parts]).drop(columns=[c for c in (*LOCATORS, group) if c in rows])
            errs = pd.DataFrame([e for _, _, es in parts for e in es], columns=["patch_id", "reason"])
            store.write_shard(name, meta, _concat([a for _, a, _ in parts]), errs)
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


