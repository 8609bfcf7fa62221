"""What a Stage 2/3 MLflow run shows besides numbers: its training curves and a few validation tiles, as PNGs.

A run that holds only ``best.ckpt`` and ``trainable.json`` says nothing at a glance; these are what a reader opens
first in the MLflow UI (the run's "Artifacts"):

* ``curves/<metric>.png`` — one figure per metric Lightning logged (:func:`gac.evaluation.figures.curve_figure`), from
the CSV
  it writes at ``<out>/logs/metrics.csv``. Lightning writes one row per logging call, so a metric's column is blank on
  the other rows: each metric keeps only its own rows (NaN dropped), and blanks are never drawn as 0.
* ``validation/<patch id>.png`` — the first :data:`N_TILES` validation tiles: σ⁰ VV/VH, the stage's input, its
  prediction and the truth in true colour with one stretch, and the error map
  (:func:`gac.evaluation.figures.comparison_figure`), each titled with its per-tile scores.

It is kept cheap on purpose: a dozen small line plots and two tiles through the model, once per fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gac.evaluation import metrics
from gac.evaluation.figures import comparison_figure, curve_figure
from gac.io.store import ShardStore
from gac.pipeline import output
from gac.training.data import PairDataset, rows_of
from gac.training.export import apply

#: Validation tiles drawn per run.
N_TILES = 2


def read_curves(csv_file: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{metric: (steps, values)}`` of Lightning's ``metrics.csv``: each metric on its own rows only (NaN dropped),
    one value per step (the last, when a resumed fit scored a step again), in step order."""
    import pandas as pd

    csv_file = Path(csv_file)
    if not csv_file.is_file() or not csv_file.stat().st_size:
        return {}
    log = pd.read_csv(csv_file)
    curves = {}
    for metric in (c for c in log.columns if c not in ("epoch", "step")):
        rows = log[["step", metric]].dropna().drop_duplicates("step", keep="last").sort_values("step")
        if len(rows):
            curves[metric] = (rows["step"].to_numpy(), rows[metric].to_numpy(dtype=np.float64))
    return curves


def log_curves(csv_file: str | Path, title: str = "") -> list[str]:
    """Log one ``curves/<metric>.png`` per metric of :func:`read_curves`; return the artifact paths."""
    import mlflow

    logged = []
    for metric, (steps, values) in read_curves(csv_file).items():
        path = f"curves/{metric.replace('/', '_')}.png"
        mlflow.log_figure(curve_figure(steps, values, metric, title), path)
        logged.append(path)
    return logged


def log_validation_tiles(
    stage: str,
    model: torch.nn.Module,
    catalog_root: str,
    source_root: str,
    exclude: Sequence[str] = (),
    n: int = N_TILES,
) -> list[str]:
    """Log ``validation/<patch id>.png`` for the first ``n`` validation tiles through ``model``; return the paths."""
    import mlflow

    ids = list(rows_of(ShardStore(catalog_root), ShardStore(source_root), "validation", n, exclude)["patch_id"])
    if not ids:
        return []
    batch = torch.utils.data.default_collate([PairDataset(catalog_root, source_root, ids)[i] for i in range(len(ids))])
    device = next(model.parameters()).device
    with torch.inference_mode():
        pred = apply(stage, model.eval(), batch["s1"].to(device), batch["source"].to(device)).float().cpu()
    dn = metrics.DN_SCALE
    source, pred, target = batch["source"] * dn, pred * dn, batch["target"] * dn
    given = f"input ({Path(source_root).name})"
    scores = {name: metrics.per_tile(x, target, batch["s1"]) for name, x in ((given, source), (output(stage), pred))}
    logged = []
    for i, patch_id in enumerate(ids):
        tile_scores = {name: {k: float(v[i]) for k, v in s.items()} for name, s in scores.items()}
        fig = comparison_figure(batch["s1"][i].numpy(), {given: source[i].numpy(), output(stage): pred[i].numpy()},
                                target[i].numpy(), f"{patch_id} · validation · {stage}, best checkpoint",
                                tile_scores)  # fmt: skip
        path = f"validation/{patch_id}.png"
        mlflow.log_figure(fig, path)
        logged.append(path)
    return logged
