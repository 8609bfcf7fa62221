"""Apply a trained stage to every tile of the previous cache: opt_v1 → opt_v2 (Stage 2), opt_v2 → opt_v3 (Stage 3).

The output is a :class:`~gac.io.store.ShardStore` like opt_v1 (key ``opt``, uint16 DN, the same index metadata; a model
with a σ head also writes its calibrated σ as key ``sigma``, :data:`gac.inference.engine.SIGMA`), written
by :func:`gac.inference.engine.run` — sharded, resumable after a kill, split across ``torchrun`` ranks, on the device,
batch size,
autocast and DataLoader workers of the stage's ``cache`` params — plus ``provenance.json`` (stage, weights origin,
registry model) inside and its timing beside it, which evaluation reports. Its ``cache.json`` fingerprint holds the
content digests of the model's weights and of both input stores, so a rerun with the same model and inputs skips every
finished shard and anything else rebuilds the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from gac.config import CacheParams
from gac.evaluation.metrics import DN_SCALE
from gac.inference import engine
from gac.io import fingerprint
from gac.io.provenance import read_timing, write_provenance, write_timing
from gac.io.store import ShardStore
from gac.training.crossfit import OutOfFold, fold_sigma
from gac.training.export import apply_with_sigma

CONFIG_FILE = "cache.json"


def work_index(catalog_root: str, source_root: str) -> pd.DataFrame:
    """The tiles of ``source_root`` in its order, with their catalog (``shard``/``row``) and source locations."""
    source = ShardStore(source_root).index.rename(columns={"shard": "src_shard", "row": "src_row"})
    at = ShardStore(catalog_root).rows_for(source["patch_id"])
    return source.assign(shard=at["shard"].to_numpy(), row=at["row"].to_numpy())


def write_cache(
    stage: str,
    model: torch.nn.Module,
    catalog_root: str,
    source_root: str,
    out: str | Path,
    params: CacheParams | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    distributed: bool = True,
) -> dict[str, Any]:
    """Refine every tile of ``source_root`` into the cache at ``out`` (missing shards only, see the module doc).

    Returns the provenance written into the cache plus the timing written beside it (see :mod:`gac.io.provenance`);
    on a ``torchrun`` rank other than 0, only the timing of that rank's work. ``distributed=False`` writes every shard
    in this process whatever the environment says (rank 0 after a DDP training).
    """
    params = params or CacheParams()
    device = engine.resolve_device(params.device)
    engine.check_precision(device, params.precision, key=f"{stage}.cache.precision")
    index = work_index(catalog_root, source_root)
    digests = {"catalog": ShardStore(catalog_root).content_digest(), "source": ShardStore(source_root).content_digest()}
    stamp = {
        "stage": stage,
        "model": fingerprint.state_digest(model.state_dict()),
        "inputs": digests,
        "tiles": fingerprint.ids_digest(index["patch_id"]),
        **params.model_dump(include={"shard_size", "batch_size", "precision"}),
        **({"fold_spread": True} if isinstance(model, OutOfFold) and model.spread else {}),  # σ differs with it
    }

    def predict(m: torch.nn.Module, s1: torch.Tensor, opt: torch.Tensor) -> dict[str, torch.Tensor]:
        mean, sigma = apply_with_sigma(stage, m, s1, opt)
        return {"opt": mean.float()} | ({} if sigma is None else {engine.SIGMA: sigma.float()})

    def step(m: torch.nn.Module, s1: torch.Tensor, opt_dn: torch.Tensor, patch_ids: list[str]) -> dict:
        s1 = s1.to(device, non_blocking=True)
        opt = (opt_dn.to(device, non_blocking=True) / DN_SCALE).clamp(0, 1)
        with torch.inference_mode(), engine.autocast(device, params.precision):
            if not isinstance(m, OutOfFold):
                return {k: v * DN_SCALE for k, v in predict(m, s1, opt).items()}
            out: dict[str, torch.Tensor] = {}
            for model, rows in m.groups(patch_ids):
                for key, value in predict(model, s1[rows], opt[rows]).items():
                    out.setdefault(key, torch.empty_like(opt))[rows] = value
            if m.spread:  # every tile through every fold model: their disagreement joins σ (crossfit.fold_sigma)
                means = torch.stack([predict(fold, s1, opt)["opt"] for fold in m.folds])
                out[engine.SIGMA] = fold_sigma(means, out.get(engine.SIGMA))
            return {k: v * DN_SCALE for k, v in out.items()}

    report = engine.run(
        out=out,
        stamp=stamp,
        catalog_root=catalog_root,
        index=index,
        step=step,
        model=model.eval(),
        shard_size=params.shard_size,
        batch_size=params.batch_size,
        device=device,
        num_workers=params.num_workers,
        source_root=source_root,
        config_file=CONFIG_FILE,
        progress=progress,
        label=f"{stage} inference",
        ranks=None if distributed else (0, 1),
    )
    timing = {
        "seconds_per_tile": report.work_seconds / max(report.generated, 1),
        "wall_seconds": report.seconds,
        "generated_this_run": report.generated,
    }
    rank = engine.dist()[0] if distributed else 0
    if rank != 0:
        return timing
    info = {"stage": stage, "tiles": len(ShardStore(out).index), "errors": len(report.errors), **(provenance or {})}
    write_provenance(out, info)
    if report.generated:
        write_timing(out, timing)
    else:  # a rerun that found the cache complete reports the timing of the run that made it
        timing = (read_timing(out) or timing) | {"generated_this_run": 0}
    return info | timing
