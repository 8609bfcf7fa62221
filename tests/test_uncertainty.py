"""Calibration figures (:mod:`gac.evaluation.uncertainty`) on errors drawn from a known σ: the truth passes, a wrong σ
fails.

Every tolerance is a sampling error of the drawn pixels (binomial for coverages, χ² for variances), at 5 standard
errors: a test that fails here found a wrong formula, not an unlucky draw.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from gac.evaluation.uncertainty import NOMINAL, CalibrationScore, fit_temperature, spearman

pytestmark = pytest.mark.numerics

#: 8 tiles × 12 bands × 64² pixels.
SHAPE = (8, 12, 64, 64)


def world(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """μ (DN), a smoothly varying true σ (50 … 2000 DN, so rounding to whole DN is negligible) and y ~ N(μ, σ²)."""
    g = torch.Generator().manual_seed(seed)
    mu = 1000 + 3000 * torch.rand(SHAPE, generator=g)
    sigma = (50 * 40 ** torch.rand(SHAPE[:2] + (1, 1), generator=g)).expand(SHAPE).clone()  # per tile and band
    sigma *= 1 + 0.5 * torch.linspace(-1, 1, SHAPE[-1])  # and across columns
    y = (mu + sigma * torch.randn(SHAPE, generator=g)).round()
    return mu.round(), sigma.round(), y


def scored(mu, sigma, y, batches: int = 1) -> dict[str, float]:
    scorer, parts = CalibrationScore(), []
    for m, s, t in zip(mu.chunk(batches), sigma.chunk(batches), y.chunk(batches), strict=True):
        parts.append(scorer.update(m, s, t))
    tiles = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
    return scorer.summary(tiles) | {"_n": float(mu.numel())}


def coverage_tolerance(level: float, n: float) -> float:
    return 5 * math.sqrt(level * (1 - level) / n)


def test_the_true_sigma_is_calibrated() -> None:
    mu, sigma, y = world()
    s = scored(mu, sigma, y)
    for name, level in NOMINAL.items():
        assert abs(s[name] - level) <= coverage_tolerance(level, s["_n"]), (name, s[name])
    # UCE: each bin's MSE estimates its mean variance with relative standard error √(2/n_b) (χ²); 5 of those, bounded
    # by the largest variance, is far above what a right formula gives and far below a factor-2 error in σ
    mean_var = float((sigma / 1e4).square().mean())
    assert s["uce"] < 0.05 * mean_var, (s["uce"], mean_var)
    assert s["spearman_pixel"] > 0.2 and s["spearman_tile"] > 0.8  # σ varies 40× between tiles: it ranks them
    assert math.isclose(s["sharpness"], float(sigma.mean() / 1e4), rel_tol=1e-6)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_wrong_sigma_misses_its_coverage_and_scores_a_larger_uce(factor: float) -> None:
    mu, sigma, y = world()
    right, wrong = scored(mu, sigma, y), scored(mu, sigma * factor, y)
    expected95 = math.erf(1.959963984540054 * factor / math.sqrt(2))  # |z| ≤ 1.96·factor for z ~ N(0, 1)
    assert abs(wrong["coverage95"] - expected95) <= coverage_tolerance(expected95, wrong["_n"]) + 1e-4
    assert abs(wrong["coverage95"] - NOMINAL["coverage95"]) > 10 * coverage_tolerance(0.95, wrong["_n"])
    assert wrong["uce"] > 5 * right["uce"]
    assert wrong["nll"] > right["nll"]  # the true σ is the NLL's minimum


def test_the_temperature_is_the_nll_fit_and_recovers_a_scale_per_band() -> None:
    mu, sigma, y = world()
    scale = torch.linspace(0.25, 4, SHAPE[1])  # per band: σ predicted this much too small/large
    shown = (sigma / scale[None, :, None, None]).round()
    t = fit_temperature(mu, shown, y)
    n_band = SHAPE[0] * SHAPE[2] * SHAPE[3]
    assert torch.allclose(t, scale, rtol=5 * math.sqrt(1 / (2 * n_band)) + 2e-3)  # mean z² ~ χ²_n / n
    calibrated = (shown * t[None, :, None, None]).round()
    assert abs(scored(mu, calibrated, y)["coverage95"] - 0.95) <= coverage_tolerance(0.95, mu.numel())
    # the closed form is the NLL's minimum: a 1 % larger or smaller temperature scores a higher NLL
    nll = {f: scored(mu, (shown * t[None, :, None, None] * f).round(), y)["nll"] for f in (0.99, 1.0, 1.01)}
    assert nll[1.0] < nll[0.99] and nll[1.0] < nll[1.01]


def test_batches_add_up_to_the_one_pass_figures() -> None:
    """Fixed bins and per-tile figures: scoring in 4 batches (or on 4 hosts) gives the figures of one pass."""
    mu, sigma, y = world(seed=3)
    one, four = scored(mu, sigma, y), scored(mu, sigma, y, batches=4)
    assert one.keys() == four.keys()
    for k in one:
        assert math.isclose(one[k], four[k], rel_tol=1e-9), k


def test_spearman_is_scipys_with_and_without_ties() -> None:
    g = np.random.default_rng(0)
    a = g.normal(size=(3, 500))
    b = a + g.normal(size=(3, 500))
    ours = spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    theirs = [stats.spearmanr(x, z).statistic for x, z in zip(a, b, strict=True)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    tied = np.round(b * 2)  # few distinct values, as whole-DN σ has
    ours = spearman(torch.from_numpy(a), torch.from_numpy(tied)).numpy()
    theirs = [stats.spearmanr(x, z).statistic for x, z in zip(a, tied, strict=True)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert math.isnan(float(spearman(torch.ones(10), torch.arange(10.0))))
