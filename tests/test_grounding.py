"""Stage 3 grounder: TerraMind tiny encoder-decoder with LoRA on the decoder's cross-attention (random init, CPU)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from gac.config import Stage3Params
from gac.errors import GacError
from gac.models import grounding

#: float comparisons of kernel output: `make test` runs them again with oneDNN and MKL held to AVX2
pytestmark = pytest.mark.numerics

P = Stage3Params(variant="terramind_v1_tiny", img_size=128)
STEPS = 5


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s1 dB, opt_v2 reflectance, target reflectance) for 2 tiles: fixed, spatially smooth (learnable) fields."""
    g = torch.Generator().manual_seed(0)

    def smooth(channels: int, scale: float) -> torch.Tensor:
        coarse = torch.randn(2, channels, 8, 8, generator=g) * scale
        return F.interpolate(coarse, size=(120, 120), mode="bilinear", align_corners=False)

    s1 = smooth(2, 3.0) + torch.tensor([-8.0, -14.0])[None, :, None, None]  # brighter than TerraMind's mean
    target = (0.2 + smooth(12, 0.08)).clamp(0, 1)
    opt_v2 = (target + smooth(12, 0.05)).clamp(0, 1)
    return s1, opt_v2, target


@pytest.fixture(scope="module")
def grounder() -> grounding.Grounder:
    torch.manual_seed(0)
    return grounding.build_grounder(P)


def _loss(model: grounding.Grounder, s1: torch.Tensor, opt_v2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    opt_v3 = model(s1, opt_v2)
    return F.l1_loss(opt_v3, target) + F.l1_loss(model.sar_from_optical(opt_v3), s1)


@pytest.fixture(scope="module")
def trained(grounder, batch) -> tuple[grounding.Grounder, list[float]]:
    """A copy of the grounder after a few Adam steps on the fixed batch (LoRA B and the heads leave zero)."""
    model = copy.deepcopy(grounder).train()
    # 10 × the default lr: Adam moves a zero-initialised head's output by about lr × its fan-in per step, and five
    # steps are all this smoke test spends (tests/test_learning.py shows learning at the real settings)
    opt = torch.optim.Adam([t for t in model.parameters() if t.requires_grad], lr=10 * P.train.lr)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = _loss(model, *batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_shapes_and_untrained_identity(grounder, batch):
    s1, opt_v2, _ = batch
    with torch.no_grad():
        opt_v3 = grounder(s1, opt_v2)
        s1_pred = grounder.sar_from_optical(opt_v2)
    assert opt_v3.shape == (2, 12, 120, 120)
    assert s1_pred.shape == (2, 2, 120, 120)
    assert torch.equal(opt_v3, opt_v2)  # zero-initialised residual head: the untrained grounder returns opt_v2
    assert torch.isfinite(s1_pred).all()


def test_only_cross_attention_lora_and_heads_train(grounder):
    report = grounding.trainable_report(grounder)
    print(f"\ntrainable {report['trainable']} / {report['total']} = {report['share']:.2%}")
    lora = r"encdec\.decoder\.\d+\.cross_attn\.(q|kv|proj)\.lora_[AB]\.default\.weight"
    allowed = re.compile(rf"{lora}|(pixel|sar)_head\.(reduce|fuse\.\d+|out)\.(weight|bias)")
    assert report["names"], "nothing trains"
    for name in report["names"]:
        assert allowed.fullmatch(name), f"{name} should be frozen"
    lora = {n for n in report["names"] if "lora_" in n}
    assert len(lora) == 2 * 3 * len(grounder.encdec.decoder)  # A and B on q, kv, proj of every decoder block
    frozen = ("encoder", "embeddings", "self_attn", "mlp", "norm", "mask_token", "decoder_proj_context", "base_layer")
    for name, param in grounder.named_parameters():
        if any(part in name for part in frozen):
            assert not param.requires_grad, f"{name} trains"
    assert 0 < report["share"] < 0.1
    assert report["trainable"] == sum(t.numel() for t in grounder.parameters() if t.requires_grad)


def test_loss_decreases(trained):
    _, losses = trained
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("path", ["forward", "cycle"])
def test_gradients_reach_lora_and_heads(trained, batch, path):
    model, _ = trained
    s1, opt_v2, target = batch
    model.zero_grad()
    opt_v3 = model(s1, opt_v2)
    if path == "forward":
        loss, heads = F.l1_loss(opt_v3, target), {"pixel_head"}
    else:  # the cycle: opt_v3 → predicted SAR, compared with the real SAR
        loss, heads = F.l1_loss(model.sar_from_optical(opt_v3), s1), {"pixel_head", "sar_head"}
    loss.backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
        elif "lora_" in name or name.split(".")[0] in heads:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name} ({path})"
    if path == "forward":
        assert all(t.grad is None or not t.grad.any() for t in model.sar_head.parameters())


def test_cross_attention_maps(trained, batch):
    model, _ = trained
    s1, opt_v2, _ = batch
    maps = model.cross_attention_maps(s1, opt_v2)
    assert maps.shape == (2, P.img_size // 16, P.img_size // 16)
    assert torch.isfinite(maps).all() and (maps >= 0).all() and (maps <= 1).all()


def test_attention_weights_reproduce_the_layer(trained, batch):
    """The recomputed weights give the fused-SDPA layer's own output (so the maps show what the layer does).

    The reference is the recomputation in float64 from the layer's own float32 inputs. The layer computes in float32
    through five chained ops (q and kv projections, logits, softmax·V, out projection), each a reduction over at most
    ``dim`` terms; ``GROWTH`` is the stated error growth of that chain, in units of float32's epsilon times the
    output's scale. A bf16 kernel (eps 2**-8: what oneDNN runs on AMX CPUs under ``set_float32_matmul_precision
    ("medium")``, which ``import terratorch`` used to leave behind) is 2**15 / GROWTH times outside it.
    """
    GROWTH = 64
    model, _ = trained
    attn, seen = model.encdec.decoder[-1].cross_attn, {}
    handle = attn.register_forward_hook(lambda _m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        model(*batch[:2])
        handle.remove()
        attn64 = copy.deepcopy(attn).double()
        x, context, mask = seen["args"]
        x, context = x.double(), context.double()
        weights = grounding._attention_weights(attn64, x, context, mask)
        (b, n, c), h = x.shape, attn64.num_heads
        v = attn64.kv(context).reshape(b, -1, 2, h, c // h)[:, :, 1].transpose(1, 2)
        reference = attn64.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
    eps = torch.finfo(torch.float32).eps
    scale = reference.abs().max().item()
    torch.testing.assert_close(seen["out"].double(), reference, rtol=GROWTH * eps, atol=GROWTH * eps * scale)


def test_ckpt_path_loads_strictly(tmp_path, batch):
    base = grounding.build_encdec(P)
    with torch.no_grad():
        for t in base.parameters():
            t.add_(0.01)
    good = tmp_path / "terramind.pt"
    torch.save(base.state_dict(), good)
    model = grounding.build_grounder(P.model_copy(update={"ckpt_path": str(good)}))
    loaded = model.encdec.encoder_embeddings[model.enc_key["S2L2A"]].proj.weight
    torch.testing.assert_close(loaded, base.encoder_embeddings[model.enc_key["S2L2A"]].proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        model.encdec.decoder[0].cross_attn.q.base_layer.weight, base.decoder[0].cross_attn.q.weight, rtol=0, atol=0
    )
    wrong = tmp_path / "wrong.pt"
    torch.save({k: v for k, v in base.state_dict().items() if not k.startswith("decoder.")}, wrong)
    with pytest.raises(GacError, match="stage3.ckpt_path"):
        grounding.build_grounder(P.model_copy(update={"ckpt_path": str(wrong)}))


def test_state_round_trip(trained, batch, tmp_path):
    model, _ = trained
    path = tmp_path / "grounder.pt"
    torch.save(grounding.grounder_state(model), path)
    restored = grounding.load_grounder(P, torch.load(path, weights_only=True)).eval()
    s1, opt_v2, _ = batch
    with torch.no_grad():
        expected = model(s1, opt_v2)
        assert not torch.equal(expected, opt_v2)  # trained: the round trip is not trivially the identity
        assert torch.equal(restored(s1, opt_v2), expected)
        assert torch.equal(restored.sar_from_optical(opt_v2), model.sar_from_optical(opt_v2))
    with pytest.raises(GacError, match="does not match"):
        grounding.load_grounder(P, {k: v for k, v in grounding.grounder_state(model).items() if "lora_" not in k})


def test_unknown_variant_is_one_line_error():
    with pytest.raises(GacError, match="stage3.variant"):
        grounding.registry_hyperparameters("terramind_v9_huge")


def test_inference_clips_to_valid_reflectance(grounder, batch):
    """Training sees the raw output; every inference path (caches, registry model, sweeps) goes through ``apply``,
    which must never hand out a negative (or > 1) reflectance."""
    from gac.training.export import apply

    s1, opt_v2, _ = batch
    model = copy.deepcopy(grounder).eval()
    with torch.no_grad():
        model.pixel_head.out.bias[:6] = -50.0  # a residual far below zero on half the bands
        model.pixel_head.out.bias[6:] = 50.0  # and far above one on the rest
        raw = model(s1, opt_v2)
        out = apply("stage3", model, s1, opt_v2)
    assert raw.min() < 0 and raw.max() > 1
    assert out.min() >= 0 and out.max() <= 1
    inside = (raw >= 0) & (raw <= 1)
    assert torch.equal(out[inside], raw[inside])
