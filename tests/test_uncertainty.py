"""The σ metrics (:mod:`gac.evaluation.uncertainty`) on data whose truth is known: y ~ N(μ, σ²) with σ varying.

n = 8·12·32·32 ≈ 98 000 draws, so a coverage's binomial standard error is ≤ sqrt(0.25 / n) ≈ 0.0016: the bounds
below are 4 standard errors (all draws are independent, so pixels count as samples).
"""

from __future__ import annotations

import math

import pytest
import torch

from gac.evaluation import uncertainty as u

SHAPE = (8, 12, 32, 32)
N = math.prod(SHAPE)


@pytest.fixture(scope="module")
def world() -> dict[str, torch.Tensor]:
    """μ in [0, 0.4], σ log-uniform in [0.001, 0.05] per pixel and band, y drawn from N(μ, σ²)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(SHAPE, generator=g) * 0.4
    sigma = torch.exp(torch.empty(SHAPE).uniform_(math.log(1e-3), math.log(5e-2), generator=g))
    y = mu + sigma * torch.randn(SHAPE, generator=g)
    return {"mu": mu, "sigma": sigma, "y": y}


def binomial_bound(p: float) -> float:
    return 4 * math.sqrt(p * (1 - p) / N)


def test_the_true_sigma_is_calibrated(world) -> None:
    r = u.report(world["mu"], world["sigma"], world["y"])
    assert abs(r["coverage68"] - 0.68) <= binomial_bound(0.68), r
    assert abs(r["coverage95"] - 0.95) <= binomial_bound(0.95), r
    # UCE ≈ 0: a bin's |MSE − MV| is sampling error only; MSE of n_b draws has sd ≈ sqrt(2/n_b)·MV, so the
    # weighted sum is ≲ a few % of the mean variance
    mean_var = float((world["sigma"].double() ** 2).mean())
    assert r["uce"] < 0.05 * mean_var, (r["uce"], mean_var)
    assert r["spearman_pixel"] > 0.3, r  # a larger σ marks a larger |error|
    assert r["sharpness"] == pytest.approx(float(world["sigma"].double().mean()))


def test_a_sigma_twice_too_large_is_seen_as_such(world) -> None:
    right = u.report(world["mu"], world["sigma"], world["y"])
    wide = u.report(world["mu"], 2 * world["sigma"], world["y"])
    expected = math.erf(2 * 1.959964 / math.sqrt(2))  # P(|z| ≤ 2·1.96) ≈ 0.99991
    assert abs(wide["coverage95"] - expected) <= 4 * math.sqrt(expected * (1 - expected) / N) + 1e-4, wide
    assert wide["uce"] > 10 * right["uce"], (wide["uce"], right["uce"])


def test_a_constant_sigma_ranks_nothing_and_a_wrong_one_ranks_backwards(world) -> None:
    mu, sigma, y = world["mu"], world["sigma"], world["y"]
    rms = float(((y - mu) ** 2).mean().sqrt())
    constant = u.report(mu, torch.full_like(sigma, rms), y)
    assert constant["spearman_pixel"] == 0.0
    backwards = u.report(mu, sigma.max() + sigma.min() - sigma, y)  # large where the truth is small
    assert backwards["spearman_pixel"] < -0.3, backwards
    assert backwards["uce"] > 10 * u.uce(mu, sigma, y)


def test_the_temperature_undoes_a_per_band_scale_and_is_the_nll_minimiser(world) -> None:
    mu, sigma, y = world["mu"], world["sigma"], world["y"]
    scale = torch.linspace(0.5, 3.0, SHAPE[1])
    t = u.fit_temperature(mu, sigma * scale.view(1, -1, 1, 1), y)
    assert torch.allclose(t * scale, torch.ones(SHAPE[1]), atol=0.02), t * scale

    def nll(temperature: torch.Tensor) -> torch.Tensor:
        s = sigma[:, :1].double() * temperature
        return (torch.log(s) + (y[:, :1] - mu[:, :1]).double() ** 2 / (2 * s**2)).mean()

    best = u.fit_temperature(mu[:, :1], sigma[:, :1], y[:, :1]).double()
    assert all(nll(best) < nll(best * f) for f in (0.97, 1.03))


def test_tile_spearman_follows_the_tiles_noise_level() -> None:
    g = torch.Generator().manual_seed(1)
    level = torch.linspace(0.005, 0.05, 6).view(-1, 1, 1, 1)
    sigma = level.expand(6, 12, 16, 16)
    y = sigma * torch.randn(sigma.shape, generator=g)
    assert u.report(torch.zeros_like(y), sigma, y)["spearman_tile"] == pytest.approx(1.0)


def test_an_overconfident_sigma_covers_what_its_interval_should(world) -> None:
    """σ half the truth: the "95 %" interval is |z| ≤ 0.98 of the real error, which covers 67 %."""
    half = u.report(world["mu"], world["sigma"] / 2, world["y"])
    expected = math.erf(1.959964 / 2 / math.sqrt(2))
    assert abs(half["coverage95"] - expected) <= binomial_bound(expected), half
    assert half["nll"] > u.report(world["mu"], world["sigma"], world["y"])["nll"]  # the true σ is the NLL minimum


def test_batches_add_up_to_the_one_pass_figures(world) -> None:
    """Fixed bins and per-tile figures: scoring in 4 batches (as ``gac evaluate`` streams a split, or 4 hosts) gives
    the figures of one pass."""
    one = u.report(world["mu"], world["sigma"], world["y"])
    scorer, parts = u.CalibrationScore(), []
    for m, s, t in zip(*(world[k].chunk(4) for k in ("mu", "sigma", "y")), strict=True):
        parts.append(scorer.update(m, s, t))
    four = scorer.summary({k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]})
    assert one.keys() == four.keys()
    for k in one:
        assert math.isclose(one[k], four[k], rel_tol=1e-9), k


def test_spearman_is_scipys_with_and_without_ties() -> None:
    import numpy as np
    from scipy import stats

    g = np.random.default_rng(0)
    a = g.normal(size=(3, 500))
    for b in (a + g.normal(size=(3, 500)), np.round(a * 2)):  # the second has few distinct values, as whole-DN σ
        ours = u.spearman_rows(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        theirs = [stats.spearmanr(x, z).statistic for x, z in zip(a, b, strict=True)]
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert float(u.spearman_rows(torch.ones(10), torch.arange(10.0))) == 0.0
