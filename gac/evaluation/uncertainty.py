"""How good a predicted per-pixel σ is: calibration, coverage, ranking and sharpness (one concept, one module).

A stage with a σ head (``stage2/3.nll_weight > 0``, :class:`gac.models.heads.SigmaHead`) predicts, for every pixel
and band, a Gaussian N(μ, σ²) of the reflectance. All functions take ``mu``, ``sigma`` and ``target`` of one shape
(``(N, C, H, W)``, reflectance), as tensors or arrays, and compute in float64.

=================  =====================================================================================================
``uce``            uncertainty calibration error as UnCRtainTS (Ebel et al., CVPR-W 2023) uses it, after Laves et al.
                   (MIDL 2020): pixels are binned by predicted *variance* σ² (``bins`` equal-width bins from 0 to the
                   largest σ²), and ``Σ_b (n_b / n) · |MSE_b − MV_b|`` — squared error against mean variance per bin,
                   weighted by the bin's share (the same definition netcal's ``metrics.regression.UCE`` documents).
                   Reflectance², 0 = calibrated.
``coverage68/95``  share of pixels inside the central Gaussian interval ``|y − μ| ≤ z·σ`` (z = 0.994, 1.960);
                   a calibrated σ gives 0.68 / 0.95.
``spearman_pixel`` Spearman rank correlation of ``|y − μ|`` and σ over the pixels of each band, averaged over
                   bands (:func:`band_spearman`): does a larger σ mark a larger error? Per band, because pooled
                   bands rank a σ that is merely larger in brighter bands (a constant per band) as informative.
``spearman_tile``  the same over tiles, of the tile's mean ``|y − μ|`` and mean σ (NaN below 3 tiles).
``sharpness``      mean σ (reflectance): of two calibrated models, the sharper is more useful.
=================  =====================================================================================================
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Bins of :func:`uce`.
UCE_BINS = 20
#: Pixels :func:`spearman` ranks at most (evenly spaced): ranking millions of pixels adds time, not information.
MAX_RANKED = 2_000_000


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().double().cpu()


def squared_z_sums(mu, sigma, target) -> tuple[torch.Tensor, int]:
    """Per band ``Σ ((y − μ) / σ)²`` over samples and pixels, and how many pixels per band: what
    :func:`fit_temperature` needs, summable over batches."""
    z2 = ((_f64(target) - _f64(mu)) / _f64(sigma)) ** 2
    return z2.sum(dim=(0, 2, 3)), z2[:, 0].numel()


def fit_temperature(mu, sigma, target) -> torch.Tensor:
    """Per-band temperature ``T_b`` (shape ``(C,)``) so that ``σ · T_b`` has the least Gaussian NLL on the data.

    Closed form: with ``s = σ·T``, the NLL per pixel is ``log T + log σ + (y − μ)² / (2σ²T²)`` (+ const); its
    derivative in ``T`` vanishes at ``T² = mean((y − μ)² / σ²)``, the only minimum (the NLL grows without bound as
    T → 0 and T → ∞). So the NLL fit is a mean, computed exactly and in one pass over any number of batches
    (:func:`squared_z_sums`), with no optimiser to converge or to seed.
    """
    sums, n = squared_z_sums(mu, sigma, target)
    return temperature_from_sums(sums, n)


def temperature_from_sums(sums: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`fit_temperature` from accumulated :func:`squared_z_sums` (float32)."""
    return torch.sqrt(sums / max(n, 1)).float()


def uce(mu, sigma, target, bins: int = UCE_BINS) -> float:
    """Uncertainty calibration error (see the module docstring), reflectance²."""
    var = _f64(sigma).flatten() ** 2
    se = ((_f64(target) - _f64(mu)) ** 2).flatten()
    edges = torch.linspace(0.0, float(var.max()), bins + 1, dtype=torch.float64)
    which = torch.bucketize(var, edges[1:-1], right=True)
    n = torch.bincount(which, minlength=bins).double()
    mse = torch.bincount(which, weights=se, minlength=bins) / n.clamp(min=1)
    mv = torch.bincount(which, weights=var, minlength=bins) / n.clamp(min=1)
    return float(((n / var.numel()) * (mse - mv).abs()).sum())


def coverage(mu, sigma, target, level: float) -> float:
    """Share of pixels in the central ``level`` interval of N(μ, σ²): ``|y − μ| ≤ z·σ``, ``z = Φ⁻¹((1+level)/2)``."""
    z = math.sqrt(2.0) * torch.erfinv(torch.tensor((1.0 + level) / 2.0, dtype=torch.float64) * 2 - 1)
    inside = (_f64(target) - _f64(mu)).abs() <= z * _f64(sigma)
    return float(inside.double().mean())


def spearman(a, b) -> float:
    """Spearman rank correlation of ``a`` and ``b`` (any shape, flattened; at most :data:`MAX_RANKED` values).

    A constant ``a`` or ``b`` ranks nothing: 0 (where scipy would warn and return NaN, which compares false with
    every bar and would hide what happened).
    """
    from scipy.stats import spearmanr

    a, b = _f64(a).flatten().numpy(), _f64(b).flatten().numpy()
    step = max(1, math.ceil(a.size / MAX_RANKED))
    a, b = a[::step], b[::step]
    if a.min() == a.max() or b.min() == b.max():
        return 0.0
    return float(spearmanr(a, b).statistic)


def band_spearman(a, b) -> float:
    """Mean over bands (axis 1) of :func:`spearman` over each band's pixels."""
    a, b = _f64(a), _f64(b)
    return float(np.mean([spearman(a[:, i], b[:, i]) for i in range(a.shape[1])]))


def sharpness(sigma) -> float:
    """Mean σ."""
    return float(_f64(sigma).mean())


def report(mu, sigma, target) -> dict[str, float]:
    """Every metric of the module docstring for one set of predictions."""
    error = (_f64(target) - _f64(mu)).abs()
    sigma64 = _f64(sigma)
    per_tile = spearman(error.mean(dim=(1, 2, 3)), sigma64.mean(dim=(1, 2, 3))) if error.shape[0] >= 3 else float("nan")
    return {
        "uce": uce(mu, sigma, target),
        "coverage68": coverage(mu, sigma, target, 0.68),
        "coverage95": coverage(mu, sigma, target, 0.95),
        "spearman_pixel": band_spearman(error, sigma64),
        "spearman_tile": per_tile,
        "sharpness": sharpness(sigma64),
    }
