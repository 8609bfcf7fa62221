"""Is a predicted σ honest? Calibration figures of a per-pixel, per-band standard deviation against the truth.

A stage that predicts σ (Stage 2/3's Gaussian head, or the spread of several Stage 1 draws) claims that its error at
a pixel is roughly ``N(0, σ²)``. These figures check the claim on tiles whose truth is known, on the conventions of
:mod:`gac.evaluation.metrics` (DN in, reflectance ``DN / 10000`` inside):

====================  ===========  ========================================================================
key                   better       what it is
====================  ===========  ========================================================================
``coverage68``        0.683        share of pixels with ``|y − μ| ≤ 1·σ`` (the central 68.3 % interval)
``coverage95``        0.95         share with ``|y − μ| ≤ 1.96·σ`` (the central 95 % interval)
``uce``               lower        uncertainty calibration error (below), reflectance²
``spearman_pixel``    higher       Spearman rank correlation of ``|y − μ|`` and σ over a tile's pixels (mean
                                   over tiles)
``spearman_tile``     higher       Spearman correlation of a tile's mean ``|y − μ|`` and its mean σ, over tiles
``sharpness``         lower        mean σ, reflectance: of two calibrated models the sharper is more useful
``nll``               lower        mean Gaussian negative log-likelihood per pixel (constant ``½ log 2π``
                                   dropped)
====================  ===========  ========================================================================

**UCE** is the uncertainty calibration error of Laves et al. (2020, "Well-calibrated regression uncertainty in
medical imaging with deep learning"), the calibration figure UnCRtainTS (Ebel et al., CVPR-W 2023) reports for cloud
removal: pixels are binned by their predicted variance σ², and ``UCE = Σ_b (n_b / N) · |MSE_b − MV_b|``, where
``MSE_b`` is the bin's mean squared error and ``MV_b`` its mean predicted variance. It is 0 when, in every bin, the
predicted variance is the variance of the error. The bins here are fixed (:data:`SIGMA_EDGES`, log-spaced in σ from
1 DN to 1.0 reflectance) rather than spread between the observed minimum and maximum, so that per-batch counts add up
across batches, workers and hosts: the figure is computed in one streaming pass, whatever the number of tiles.

σ is stored as uint16 DN like the mean, so a σ below half a DN reads as 0; every σ is floored at
:data:`SIGMA_FLOOR_DN`, the standard deviation of the rounding to whole DN itself (``1/√12`` DN), the uncertainty no
stored value can avoid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from gac.sensors import DN_SCALE

#: Half-width of the central 68.27 % and 95 % Gaussian intervals, in σ (``Φ⁻¹(0.8413)``, ``Φ⁻¹(0.975)``).
Z: dict[str, float] = {"coverage68": 1.0, "coverage95": 1.959963984540054}
#: What a calibrated σ covers: the nominal level of each coverage figure.
NOMINAL: dict[str, float] = {"coverage68": math.erf(1 / math.sqrt(2)), "coverage95": 0.95}
#: The standard deviation of rounding to whole DN (uniform on ±0.5 DN): the floor of every stored σ.
SIGMA_FLOOR_DN = 1 / math.sqrt(12)
#: Fixed UCE bin edges in σ (reflectance): 1 DN … 1.0, log-spaced, plus 0 and ∞ as outer edges.
SIGMA_EDGES = np.concatenate([[0.0], np.logspace(-4, 0, 33), [np.inf]])
#: Pixels per tile the within-tile Spearman correlation is computed on (a fixed stride through the tile's values):
#: ranks cost ``n log n``, and 4096 pixels give it to ±0.02 at 95 %, ample for a figure reported to 2 digits.
SPEARMAN_PIXELS = 4096
#: The figures of :meth:`CalibrationScore.summary`, in table order.
FIGURES: tuple[str, ...] = ("coverage68", "coverage95", "uce", "spearman_pixel", "spearman_tile", "sharpness", "nll")


def to_sigma(sigma_dn: Tensor) -> Tensor:
    """σ in reflectance from stored DN, floored at :data:`SIGMA_FLOOR_DN` (see the module docstring)."""
    return sigma_dn.float().clamp_min(SIGMA_FLOOR_DN) / DN_SCALE


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation along the last axis (average ranks for ties: stored σ is whole DN, so ties are common);
    NaN where either side is constant."""
    from scipy import stats

    ra, rb = (torch.from_numpy(stats.rankdata(x.detach().cpu().numpy(), axis=-1)) for x in (a, b))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    den = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-300), torch.nan)


def fit_temperature(mu_dn: Tensor, sigma_dn: Tensor, target_dn: Tensor) -> Tensor:
    """Per-band factor ``T_b`` that makes ``T_b·σ`` the maximum-likelihood scale on these tiles.

    For ``y ~ N(μ, T²σ²)`` the negative log-likelihood in ``T`` is ``N log T + Σ z² / (2T²)`` with ``z = (y − μ)/σ``;
    its minimum is at ``T² = mean(z²)``: the NLL fit has this closed form, so no optimiser (and no learning rate,
    and no convergence question) is involved. Inputs ``(B, C, H, W)`` DN; returns ``(C,)``.
    """
    z2 = ((target_dn.double() - mu_dn.double()) / to_sigma(sigma_dn).double() / DN_SCALE).square()
    return z2.mean(dim=(0, 2, 3)).sqrt().float()


def _mean(values: np.ndarray) -> float:
    """Mean of the defined values (a tile whose σ is constant has no Spearman correlation); NaN when none is."""
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if len(defined) else math.nan


@dataclass
class CalibrationScore:
    """Streaming calibration figures of one ablation row: :meth:`update` per batch, :meth:`summary` at the end."""

    bins_n: np.ndarray = field(default_factory=lambda: np.zeros(len(SIGMA_EDGES) - 1))
    bins_sq_err: np.ndarray = field(default_factory=lambda: np.zeros(len(SIGMA_EDGES) - 1))
    bins_var: np.ndarray = field(default_factory=lambda: np.zeros(len(SIGMA_EDGES) - 1))

    def update(self, mu_dn: Tensor, sigma_dn: Tensor, target_dn: Tensor) -> dict[str, Tensor]:
        """Add a batch ``(B, C, H, W)`` (DN); return its per-tile figures (``(B,)`` each, CPU float64).

        Per tile: both coverages, ``sharpness`` (mean σ), ``abs_err`` (mean ``|y − μ|``, for ``spearman_tile``),
        ``spearman_pixel`` and ``nll``.
        """
        err = (target_dn.double() - mu_dn.double()) / DN_SCALE
        sigma = to_sigma(sigma_dn).double()
        abs_err, flat = err.abs(), lambda t: t.flatten(1)
        out = {name: (abs_err <= z * sigma).double().flatten(1).mean(1) for name, z in Z.items()}
        out["sharpness"] = flat(sigma).mean(1)
        out["abs_err"] = flat(abs_err).mean(1)
        stride = max(flat(sigma).shape[1] // SPEARMAN_PIXELS, 1)
        out["spearman_pixel"] = spearman(flat(abs_err)[:, ::stride], flat(sigma)[:, ::stride])
        out["nll"] = flat(torch.log(sigma) + 0.5 * (err / sigma).square()).mean(1)
        which = np.digitize(sigma.flatten().cpu().numpy(), SIGMA_EDGES[1:-1])
        self.bins_n += np.bincount(which, minlength=len(self.bins_n))
        self.bins_sq_err += np.bincount(which, err.square().flatten().cpu().numpy(), minlength=len(self.bins_n))
        self.bins_var += np.bincount(which, sigma.square().flatten().cpu().numpy(), minlength=len(self.bins_n))
        return {k: v.cpu() for k, v in out.items()}

    def uce(self) -> float:
        """``Σ_b (n_b / N) |MSE_b − MV_b|`` over the non-empty bins (see the module docstring)."""
        full = self.bins_n > 0
        if not full.any():
            return math.nan
        n = self.bins_n[full]
        gap = np.abs(self.bins_sq_err[full] / n - self.bins_var[full] / n)
        return float((n / n.sum() * gap).sum())

    def summary(self, per_tile: dict[str, np.ndarray]) -> dict[str, float]:
        """The row's figures (:data:`FIGURES`) from its per-tile values (all tiles of the split) and the bins."""
        tiles = {k: np.array(v, dtype=np.float64) for k, v in per_tile.items()}  # a copy: torch wants it writable
        out = {k: _mean(tiles[k]) for k in ("coverage68", "coverage95", "sharpness", "nll", "spearman_pixel")}
        out["spearman_tile"] = (
            float(spearman(torch.from_numpy(tiles["abs_err"]), torch.from_numpy(tiles["sharpness"])))
            if len(tiles["abs_err"]) > 2 else math.nan
        )  # fmt: skip
        out["uce"] = self.uce()
        return {k: out[k] for k in FIGURES}
