"""Calibrate a fitted stage's σ on the validation split: one temperature per band, stored in the model.

The σ head (:class:`gac.models.heads.SigmaHead`) is trained by a Gaussian NLL on the train tiles, where it sees the
errors of a mean that has fitted those very tiles: its σ is typically too small on tiles it never saw, and by a
factor that differs per band. After the fit, :func:`calibrate` scales it on the ``validation`` split — tiles the
weights never trained on, and the split that already chose the checkpoint — by the per-band temperature that
minimises the NLL there (closed form, :func:`gac.evaluation.uncertainty.fit_temperature`), with the mean and σ
exactly as inference computes them (:func:`gac.training.export.apply_with_sigma`, clipped mean). The temperature is a
buffer of the model, so the exported weights, the registered model and every cache writer use it with no further
step. The test split is never looked at here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gac.evaluation import uncertainty
from gac.sensors import S2_BANDS
from gac.training.export import apply_with_sigma

#: Validation tiles the calibration report (:func:`gac.evaluation.uncertainty.report`) is computed on at most: the
#: temperature uses every tile (summed in one pass), the report keeps the tiles in memory.
REPORT_TILES = 64


def calibrate(stage: str, model: torch.nn.Module, batches: Iterable[dict], device: torch.device) -> dict[str, float]:
    """Fit and set ``model.sigma_head.temperature`` on ``batches`` (validation); returns what to log: the temperature
    per band (``calibration/T_<band>``) and the calibrated report on up to :data:`REPORT_TILES` tiles
    (``calibration/val_<metric>``)."""
    head = model.sigma_head
    head.temperature.fill_(1.0)
    sums, n, kept = torch.zeros(len(S2_BANDS), dtype=torch.float64), 0, []
    with torch.inference_mode():
        for batch in batches:
            s1, source = batch["s1"].to(device), batch["source"].to(device)
            mean, sigma = (t.float().cpu() for t in apply_with_sigma(stage, model, s1, source))
            target = batch["target"].float()
            batch_sums, batch_n = uncertainty.squared_z_sums(mean, sigma, target)
            sums, n = sums + batch_sums, n + batch_n
            if sum(len(m) for m, _, _ in kept) < REPORT_TILES:
                kept.append((mean, sigma, target))
    if not n:  # no validation tiles: σ stays as trained (temperature 1)
        return {}
    temperature = uncertainty.temperature_from_sums(sums, n)
    head.temperature.copy_(temperature.to(head.temperature.device))
    mean, sigma, target = (torch.cat(parts)[:REPORT_TILES] for parts in zip(*kept, strict=True))
    report = uncertainty.report(mean, sigma * temperature.view(1, -1, 1, 1), target)
    return {f"calibration/T_{band}": float(t) for band, t in zip(S2_BANDS, temperature, strict=True)} | {
        f"calibration/val_{k}": v for k, v in report.items()
    }
