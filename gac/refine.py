"""Apply a trained stage to every tile of the previous cache: opt_v1 → opt_v2 (Stage 2), opt_v2 → opt_v3 (Stage 3).

The output is a :class:`~gac.store.ShardStore` like opt_v1 (key ``opt``, uint16 DN, the same index metadata), plus
``provenance.json`` (stage, weights origin, registry model) inside and its timing beside it, which evaluation reports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gac.atomic import atomic_path
from gac.provenance import PROVENANCE, write_timing
from gac.store import ShardStore
from gac.training.data import reflectance
from gac.training.export import apply


def write_cache(
    stage: str,
    model: torch.nn.Module,
    catalog_root: str,
    source_root: str,
    out: str | Path,
    batch_size: int = 8,
    shard_size: int = 256,
    provenance: dict[str, Any] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Refine every tile of ``source_root`` and write the next cache to ``out`` (rebuilt whole, atomically).

    Returns the provenance written into the cache plus the timing written beside it (see :mod:`gac.provenance`).
    """
    from tqdm import tqdm

    catalog, source = ShardStore(catalog_root), ShardStore(source_root)
    index = source.index
    model = model.to(device).eval()
    start, seconds = time.perf_counter(), 0.0
    with atomic_path(out) as tmp:
        store = ShardStore(tmp)
        for s0 in tqdm(range(0, len(index), shard_size), desc=f"{stage} inference", unit="shard"):
            rows = index.iloc[s0 : s0 + shard_size]
            cat_rows = catalog.rows_for(rows["patch_id"])
            outs = []
            for b in range(0, len(rows), batch_size):
                s1 = torch.from_numpy(catalog.read("s1", cat_rows.iloc[b : b + batch_size])).to(device)
                opt = reflectance(source.read("opt", rows.iloc[b : b + batch_size])).to(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    pred = apply(stage, model, s1, opt).float().cpu().numpy()
                seconds += time.perf_counter() - t0
                outs.append(np.clip(np.rint(pred * 10000.0), 0, 65535).astype(np.uint16))
            store.write_shard(
                f"{s0 // shard_size:05d}", rows.drop(columns=["shard", "row"]), {"opt": np.concatenate(outs)}
            )
        store.finalize()
        info = {"stage": stage, "tiles": len(index), **(provenance or {})}
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2, sort_keys=True))
    timing = {"seconds_per_tile": seconds / max(len(index), 1), "wall_seconds": time.perf_counter() - start}
    write_timing(out, timing)
    return info | timing
