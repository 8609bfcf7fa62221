"""The σ branch (``stage2/3.nll_weight``): absent at weight 0, and when present it cannot touch the mean.

Both stages are built twice from the same seed, without and with the branch (random init, tiny variants, 128 px):
weight 0 must be today's model (no σ key in the state dict, so its fingerprint and exported weights are unchanged),
and the model with the branch must hold the very same other weights and predict the very same mean, bit for bit. The
Gaussian NLL must reach the σ head only (:func:`gac.training.task.nll_term` detaches the mean; the head detaches the
decoder features), and the calibrated σ is the head's σ times its per-band temperature.
"""

from __future__ import annotations

import pytest
import torch

from gac.config import Stage2Params, Stage3Params
from gac.training.export import apply_with_sigma, has_sigma
from gac.training.task import nll_term

STAGES = ["stage2", "stage3"]


def build(stage: str, nll_weight: float) -> torch.nn.Module:
    from gac.models.grounding import build_grounder
    from gac.models.prithvi import build_refiner

    torch.manual_seed(0)
    if stage == "stage2":
        return build_refiner(Stage2Params(img_size=128, nll_weight=nll_weight))
    return build_grounder(Stage3Params(img_size=128, nll_weight=nll_weight))


@pytest.fixture(scope="module", params=STAGES)
def pair(request, non_identity) -> dict:
    """``plain`` (weight 0) and ``sigma`` (weight 0.05) models of one stage, heads moved by the same seed."""
    stage = request.param
    g = torch.Generator().manual_seed(3)
    batch = {
        "s1": torch.rand(2, 2, 120, 120, generator=g) * -25,
        "opt": torch.rand(2, 12, 120, 120, generator=g) * 0.4,
        "target": torch.rand(2, 12, 120, 120, generator=g) * 0.4,
    }
    plain, after_plain = non_identity(build(stage, 0.0)).eval(), torch.random.get_rng_state()
    sigma, after_sigma = non_identity(build(stage, 0.05)).eval(), torch.random.get_rng_state()
    rng_kept = torch.equal(after_plain, after_sigma)
    return {"stage": stage, "plain": plain, "sigma": sigma, "batch": batch, "rng_kept": rng_kept}


def inputs(pair: dict) -> tuple[torch.Tensor, ...]:
    b = pair["batch"]
    return (b["opt"],) if pair["stage"] == "stage2" else (b["s1"], b["opt"])


def test_weight_zero_builds_no_branch_and_the_branch_changes_no_other_weight(pair) -> None:
    plain, sigma = pair["plain"].state_dict(), pair["sigma"].state_dict()
    assert not has_sigma(pair["plain"]) and has_sigma(pair["sigma"])
    assert not any("sigma" in k for k in plain)
    extra = set(sigma) - set(plain)
    assert extra and all(k.startswith("sigma_head.") for k in extra), extra
    assert set(plain) <= set(sigma)
    assert all(torch.equal(plain[k], sigma[k]) for k in plain)  # the branch is built last: same init for the rest
    assert pair["rng_kept"]  # and on a forked RNG: later draws (the training data's order) are the same too


def test_the_branch_predicts_the_same_mean_bit_for_bit_and_a_varying_sigma(pair) -> None:
    with torch.no_grad():
        mean_plain, none = pair["plain"].distribution(*inputs(pair))
        mean, log_var = pair["sigma"].distribution(*inputs(pair))
        assert torch.equal(pair["plain"](*inputs(pair)), mean_plain)  # forward is the distribution's mean
    assert none is None
    assert torch.equal(mean, mean_plain)
    assert log_var.shape == mean.shape and torch.isfinite(log_var).all()
    assert log_var.std() > 0.1  # moved heads: σ varies over pixels and bands


def test_the_nll_trains_the_sigma_head_only(pair) -> None:
    model = pair["sigma"]
    model.zero_grad()
    mean, log_var = model.distribution(*inputs(pair))
    nll_term(mean, log_var, pair["batch"]["target"]).backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached and all(n.startswith("sigma_head.") for n in reached), sorted(reached)[:5]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("sigma_head.")}
    assert reached == trainable
    model.zero_grad()


def test_the_calibrated_sigma_is_the_heads_sigma_times_the_band_temperature(pair) -> None:
    model, b = pair["sigma"], pair["batch"]
    with torch.no_grad():
        _, raw = apply_with_sigma(pair["stage"], model, b["s1"], b["opt"])
        t = torch.linspace(0.5, 2.0, 12)
        model.sigma_head.temperature.copy_(t)
        try:
            mean, scaled = apply_with_sigma(pair["stage"], model, b["s1"], b["opt"])
        finally:
            model.sigma_head.temperature.fill_(1.0)
    assert torch.allclose(scaled, raw * t.view(1, -1, 1, 1))
    assert 0.0 <= mean.min() <= mean.max() <= 1.0
    assert "sigma_head.temperature" in model.state_dict()  # exported with the weights
