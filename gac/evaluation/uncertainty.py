"""Is a predicted σ honest? Calibration, coverage, ranking and sharpness of a per-pixel, per-band σ.

A stage that predicts σ — Stage 2/3's Gaussian head (``stage2/3.nll_weight > 0``, :class:`gac.models.heads.SigmaHead`)
or the spread of several Stage 1 draws (``stage1.samples``) — claims that its error at a pixel is roughly
``N(0, σ²)``. These figures check the claim where the truth is known. Inputs are ``mu``, ``sigma``, ``target`` of one
shape ``(N, C, H, W)`` in **reflectance** (caches hold DN: :func:`from_dn`), computed in float64:

====================  ===========  ========================================================================
key                   best         what it is
====================  ===========  ========================================================================
``coverage68``        0.683        share of pixels with ``|y − μ| ≤ 1·σ`` (the central 68.3 % interval)
``coverage95``        0.95         share with ``|y − μ| ≤ 1.96·σ`` (the central 95 % interval)
``uce``               0            uncertainty calibration error (below), reflectance²
``spearman_pixel``    1            Spearman rank correlation of ``|y − μ|`` and σ over a tile's pixels, band by
                                   band, averaged over bands and tiles: does a larger σ mark a larger error?
                                   Per band, because pooled bands would credit a σ that is merely larger in
                                   brighter bands (a constant per band); 0 where σ is constant (it ranks nothing)
``spearman_tile``     1            the same over tiles, of a tile's mean ``|y − μ|`` and mean σ (NaN below 3)
``sharpness``         low          mean σ, reflectance: of two calibrated models the sharper is more useful
``nll``               low          mean Gaussian negative log-likelihood per pixel (``½ log 2π`` dropped)
====================  ===========  ========================================================================

**UCE** is the uncertainty calibration error of Laves et al. (MIDL 2020, "Well-calibrated regression uncertainty in
medical imaging with deep learning"), which UnCRtainTS (Ebel et al., CVPR-W 2023) reports for cloud removal (the
definition netcal's ``metrics.regression.UCE`` documents): pixels are binned by their predicted variance, and
``UCE = Σ_b (n_b / N) · |MSE_b − MV_b|`` — each bin's mean squared error against its mean predicted variance. It is 0
when, in every bin, the predicted variance is the variance of the error. Here the bins are fixed (:data:`SIGMA_EDGES`,
log-spaced in σ from 1 DN to reflectance 1, i.e. in σ² from 1e-8 to 1) instead of equal-width between 0 and the
largest variance: fixed bins add up over batches, workers and hosts, so ``gac evaluate`` computes the figure in one
streaming pass at any number of tiles (:class:`CalibrationScore`); log spacing keeps a long-tailed σ from putting
nearly every pixel into the first of equal-width bins.

σ is stored as uint16 DN like the mean, so a σ below half a DN reads as 0; every σ is floored at
:data:`SIGMA_FLOOR_DN`, the standard deviation of the rounding to whole DN (``1/√12`` DN) that no stored value avoids.
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
#: The standard deviation of rounding to whole DN (uniform on ±0.5 DN): the floor of every σ scored.
SIGMA_FLOOR_DN = 1 / math.sqrt(12)
#: Fixed UCE bin edges in σ (reflectance): 1 DN … 1.0, log-spaced, with 0 and ∞ as the outer edges.
SIGMA_EDGES = np.concatenate([[0.0], np.logspace(-4, 0, 33), [np.inf]])
#: Pixels per tile and band the within-tile Spearman correlation ranks (a fixed stride through the band): ranks cost
#: ``n log n``, and 1024 pixels give a correlation to about ±0.06 at 95 % per band, averaged over 12 bands and every
#: tile of a split.
SPEARMAN_PIXELS = 1024
#: The figures of :meth:`CalibrationScore.summary`, in table order.
FIGURES: tuple[str, ...] = ("coverage68", "coverage95", "uce", "spearman_pixel", "spearman_tile", "sharpness", "nll")


def _f64(x) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().double().cpu()


def from_dn(mu_dn, sigma_dn, target_dn) -> tuple[Tensor, Tensor, Tensor]:
    """Stored DN (mean, σ, truth) → reflectance, σ floored at :data:`SIGMA_FLOOR_DN` (see the module docstring)."""
    return _f64(mu_dn) / DN_SCALE, _f64(sigma_dn).clamp_min(SIGMA_FLOOR_DN) / DN_SCALE, _f64(target_dn) / DN_SCALE


# --------------------------------------------------------------------------------------------------- ranking


def spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation along the last axis (average ranks for ties: stored σ is whole DN, so ties are common);
    0 where either side is constant (it ranks nothing; NaN would compare false with every bar and hide that)."""
    from scipy import stats

    ra, rb = (torch.from_numpy(stats.rankdata(_f64(x).numpy(), axis=-1)) for x in (a, b))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    den = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-300), 0.0)


#: Pixels :func:`spearman` ranks at most (evenly spaced): ranking millions of pixels adds time, not information.
MAX_RANKED = 2_000_000


def spearman(a, b) -> float:
    """Spearman rank correlation of ``a`` and ``b`` flattened (at most :data:`MAX_RANKED` values, evenly spaced)."""
    a, b = _f64(a).flatten(), _f64(b).flatten()
    step = max(1, math.ceil(a.numel() / MAX_RANKED))
    return float(spearman_rows(a[::step], b[::step]))


def band_spearman(a, b) -> float:
    """Mean over bands (axis 1) of :func:`spearman` over each band's pixels."""
    a, b = _f64(a), _f64(b)
    return float(np.mean([spearman(a[:, i], b[:, i]) for i in range(a.shape[1])]))


# ------------------------------------------------------------------------------------------------ temperature


def squared_z_sums(mu, sigma, target) -> tuple[Tensor, int]:
    """Per band ``Σ ((y − μ) / σ)²`` over samples and pixels, and how many pixels per band: what
    :func:`fit_temperature` needs, summable over batches."""
    z2 = ((_f64(target) - _f64(mu)) / _f64(sigma)) ** 2
    return z2.sum(dim=(0, 2, 3)), z2[:, 0].numel()


def fit_temperature(mu, sigma, target) -> Tensor:
    """Per-band temperature ``T_b`` (shape ``(C,)``) so that ``σ · T_b`` has the least Gaussian NLL on the data.

    Closed form: with ``s = σ·T``, the NLL per pixel is ``log T + log σ + (y − μ)² / (2σ²T²)`` (+ const); its
    derivative in ``T`` vanishes at ``T² = mean((y − μ)² / σ²)``, the only minimum (the NLL grows without bound as
    T → 0 and T → ∞). So the NLL fit is a mean, computed exactly and in one pass over any number of batches
    (:func:`squared_z_sums`), with no optimiser to converge or to seed. Unit-free: DN or reflectance alike.
    """
    sums, n = squared_z_sums(mu, sigma, target)
    return temperature_from_sums(sums, n)


def temperature_from_sums(sums: Tensor, n: int) -> Tensor:
    """:func:`fit_temperature` from accumulated :func:`squared_z_sums` (float32)."""
    return torch.sqrt(sums / max(n, 1)).float()


# ------------------------------------------------------------------------------------------------ the figures


def coverage(mu, sigma, target, level: float) -> float:
    """Share of pixels in the central ``level`` interval of N(μ, σ²): ``|y − μ| ≤ z·σ``, ``z = Φ⁻¹((1+level)/2)``."""
    z = math.sqrt(2.0) * torch.erfinv(torch.tensor(level, dtype=torch.float64))
    return float(((_f64(target) - _f64(mu)).abs() <= z * _f64(sigma)).double().mean())


def sharpness(sigma) -> float:
    """Mean σ."""
    return float(_f64(sigma).mean())


@dataclass
class CalibrationScore:
    """Streaming calibration figures of one set of predictions: :meth:`update` per batch, :meth:`summary` at the end
    (``gac evaluate`` keeps one per ablation row with σ; :func:`report` is the one-batch case)."""

    bins_n: np.ndarray = field(default_factory=lambda: np.zeros(len(SIGMA_EDGES) - 1))
    bins_sq_err: np.ndarray = field(default_factory=lambda: np.zeros(len(SIGMA_EDGES) - 1))
    bins_var: np.ndarray = field(default_factory=lambda: np.zeros(len(SIGMA_EDGES) - 1))

    def update(self, mu, sigma, target) -> dict[str, Tensor]:
        """Add a batch ``(B, C, H, W)`` (reflectance); return its per-tile figures (``(B,)`` each, float64).

        Per tile: both coverages, ``sharpness`` (mean σ), ``abs_err`` (mean ``|y − μ|``, for ``spearman_tile``),
        ``spearman_pixel`` (:func:`spearman_rows` per band on a stride of :data:`SPEARMAN_PIXELS`, mean over bands)
        and ``nll``.
        """
        err = _f64(target) - _f64(mu)
        sig = _f64(sigma).clamp_min(SIGMA_FLOOR_DN / DN_SCALE)
        abs_err = err.abs()
        out = {name: (abs_err <= z * sig).double().flatten(1).mean(1) for name, z in Z.items()}
        out["sharpness"] = sig.flatten(1).mean(1)
        out["abs_err"] = abs_err.flatten(1).mean(1)
        stride = max(abs_err[0, 0].numel() // SPEARMAN_PIXELS, 1)
        out["spearman_pixel"] = spearman_rows(abs_err.flatten(2)[..., ::stride], sig.flatten(2)[..., ::stride]).mean(1)
        out["nll"] = (torch.log(sig) + 0.5 * (err / sig).square()).flatten(1).mean(1)
        which = np.digitize(sig.flatten().numpy(), SIGMA_EDGES[1:-1])
        self.bins_n += np.bincount(which, minlength=len(self.bins_n))
        self.bins_sq_err += np.bincount(which, err.square().flatten().numpy(), minlength=len(self.bins_n))
        self.bins_var += np.bincount(which, sig.square().flatten().numpy(), minlength=len(self.bins_n))
        return out

    def uce(self) -> float:
        """``Σ_b (n_b / N) |MSE_b − MV_b|`` over the non-empty bins (see the module docstring)."""
        full = self.bins_n > 0
        if not full.any():
            return math.nan
        n = self.bins_n[full]
        gap = np.abs(self.bins_sq_err[full] / n - self.bins_var[full] / n)
        return float((n / n.sum() * gap).sum())

    def summary(self, per_tile: dict[str, np.ndarray]) -> dict[str, float]:
        """The figures (:data:`FIGURES`) from the per-tile values of every tile and the bins."""
        tiles = {k: np.array(v, dtype=np.float64) for k, v in per_tile.items()}  # a copy: torch wants it writable
        out = {k: _mean(tiles[k]) for k in ("coverage68", "coverage95", "sharpness", "nll", "spearman_pixel")}
        out["spearman_tile"] = (
            float(spearman_rows(torch.from_numpy(tiles["abs_err"]), torch.from_numpy(tiles["sharpness"])))
            if len(tiles["abs_err"]) > 2 else math.nan
        )  # fmt: skip
        out["uce"] = self.uce()
        return {k: out[k] for k in FIGURES}


def _mean(values: np.ndarray) -> float:
    """Mean of the defined values; NaN when none is."""
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if len(defined) else math.nan


def uce(mu, sigma, target) -> float:
    """The uncertainty calibration error of one set of predictions (see the module docstring), reflectance²."""
    scorer = CalibrationScore()
    scorer.update(mu, sigma, target)
    return scorer.uce()


def report(mu, sigma, target) -> dict[str, float]:
    """Every figure of :data:`FIGURES` for one set of predictions (reflectance)."""
    scorer = CalibrationScore()
    return scorer.summary({k: v.numpy() for k, v in scorer.update(mu, sigma, target).items()})
