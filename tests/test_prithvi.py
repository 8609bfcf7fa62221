"""Stage 2 network: Prithvi-EO-2.0 tiny (random init) + LoRA (+ int8 base) + zero-init residual head."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gac.config import LoraParams, Stage2Params
from gac.errors import GacError
from gac.models import prithvi
from gac.models.prithvi import build_backbone, build_refiner, load_refiner, refiner_state, trainable_report

#: float comparisons of kernel output: `make test` runs them again with oneDNN and MKL held to AVX2
pytestmark = pytest.mark.numerics

P = Stage2Params(img_size=128)
P8 = Stage2Params(img_size=128, load_in_8bit=True)
LORA_WEIGHT = re.compile(r"backbone\.blocks\.\d+\.attn\.(qkv|proj)\.lora_[AB]\.default\.weight")
LR = 3e-3


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two opt_v1-like tiles in [0, 1] and a fixed target a radiometric correction away from them."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 12, 120, 120, generator=g)
    return x, (0.8 * x + 0.05).clamp(0, 1)


@pytest.fixture(scope="module")
def refiner() -> prithvi.Refiner:
    torch.manual_seed(0)
    return build_refiner(P)


def train(model: nn.Module, batch, optimizer, steps: int) -> dict:
    """A few L1 steps on one batch; records the loss before each step and the gradients of steps 0 and 2."""
    x, target = batch
    losses, grads = [], {}
    for step in range(steps):
        loss = (model(x) - target).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        if step in (0, 2):
            grads[step] = {n: prm.grad.abs().sum().item() for n, prm in model.named_parameters() if prm.requires_grad}
        optimizer.step()
    return {"losses": losses, "grads": grads}


@pytest.fixture(scope="module")
def trained(batch) -> tuple[prithvi.Refiner, dict]:
    torch.manual_seed(1)
    model = build_refiner(P)
    opt = torch.optim.AdamW([prm for prm in model.parameters() if prm.requires_grad], lr=LR)
    return model, train(model, batch, opt, steps=3)


@pytest.fixture(scope="module")
def trained_8bit(batch) -> tuple[prithvi.Refiner, dict]:
    import bitsandbytes as bnb

    torch.manual_seed(2)
    model = build_refiner(P8)
    opt = bnb.optim.AdamW8bit([prm for prm in model.parameters() if prm.requires_grad], lr=LR)
    return model, train(model, batch, opt, steps=6)


def test_untrained_refiner_is_the_identity(refiner, batch):
    x, _ = batch
    with torch.no_grad():
        out = refiner(x)
    assert out.shape == (2, 12, 120, 120)
    assert torch.equal(out, x)


def test_all_twelve_bands_enter_with_their_statistics(refiner):
    assert refiner.backbone.patch_embed.proj.conv.in_channels == 12
    names = [getattr(b, "value", b) for b in refiner.backbone.model_bands]
    assert names == list(prithvi.BAND_NAMES)
    mean, std = prithvi.band_statistics(P)
    assert mean[1].item() == pytest.approx(0.1087)  # B02 = HLS BLUE: Prithvi-EO-2.0's own mean (DN 1087)
    assert mean[0].item() == pytest.approx(0.1390458)  # B01: TerraMind v1 S2L2A mean (DN 1390.458)
    assert bool((std > 0).all())


def test_trainable_parameters_are_exactly_lora_new_bands_and_head(refiner):
    report = trainable_report(refiner)
    print(f"\ntrainable {report['trainable']:,} / total {report['total']:,} = {report['share']:.2%}")
    lora = [n for n in report["names"] if "lora_" in n]
    head = [n for n in report["names"] if n.startswith("head.")]
    bands = ["backbone.patch_embed.proj.new_band_weight"]
    assert sorted(lora + head + bands) == sorted(report["names"])
    assert all(LORA_WEIGHT.fullmatch(n) for n in lora)
    assert len(lora) == 2 * 2 * len(refiner.backbone.blocks)  # A and B on qkv and proj of every block
    frozen = [prm for n, prm in refiner.backbone.named_parameters() if "lora_" not in n and "new_band" not in n]
    assert not any(prm.requires_grad for prm in frozen)
    lora_modules = [n for n, m in refiner.named_modules() if hasattr(m, "lora_A")]
    assert lora_modules and all(prithvi.LORA_SITE.fullmatch(n) for n in lora_modules)
    assert report["trainable"] == sum(prm.numel() for n, prm in refiner.named_parameters() if n in report["names"])
    assert 0 < report["share"] < 0.1


def test_gradients_reach_lora_once_head_and_b_moved(trained):
    _, log = trained
    step0, step2 = log["grads"][0], log["grads"][2]
    # At step 0 the head's last layer and every lora_B are zero: only the head's last layer can get a gradient.
    assert step0["head.out.weight"] > 0
    assert all(g == 0 for n, g in step0.items() if "lora_" in n)
    # Two steps later the head and the B matrices have moved off zero, so every adapter matrix receives a gradient.
    assert all(g > 0 for n, g in step2.items() if "lora_" in n)
    assert log["losses"][-1] < log["losses"][0]


def test_new_bands_embeddings_train_and_pretrained_ones_stay(trained):
    model, _ = trained
    new = prithvi.new_band_indices(P)
    assert [prithvi.BAND_NAMES[i] for i in new] == [
        "COASTAL_AEROSOL", "RED_EDGE_1", "RED_EDGE_2", "RED_EDGE_3", "NIR_BROAD", "WATER_VAPOR"
    ]  # fmt: skip
    embedding = model.backbone.patch_embed.proj
    assert embedding.new_band_weight.abs().sum() > 0  # it moved off its zero init
    assert not embedding.conv.weight.requires_grad  # the loaded embedding itself is frozen
    # the effective embedding: new columns changed, the six pretrained columns exactly as loaded
    x = torch.zeros(1, 12, 1, 16, 16)
    x[:, new[0]] = 1.0
    assert not torch.allclose(embedding(x), embedding.conv(x))
    x = torch.zeros(1, 12, 1, 16, 16)
    x[:, prithvi.BAND_NAMES.index("BLUE")] = 1.0
    torch.testing.assert_close(embedding(x), embedding.conv(x))


def test_int8_base_weights_and_bnb_lora_layers(trained_8bit, refiner):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt

    model, _ = trained_8bit
    backbone = model.backbone
    assert not any(type(m) is nn.Linear for n, m in backbone.named_modules() if "lora_" not in n)
    int8 = [m for m in backbone.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == 4 * len(backbone.blocks)  # qkv, proj, fc1, fc2
    assert all(m.weight.dtype == torch.int8 for m in int8)
    wrapped = {n: m for n, m in backbone.named_modules() if isinstance(m, LoraLinear8bitLt)}
    assert len(wrapped) == 2 * len(backbone.blocks)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in wrapped.values())
    assert all(type(m) is nn.Linear for m in model.head.modules() if isinstance(m, nn.Linear))
    report = trainable_report(model)
    assert report["names"] == trainable_report(refiner)["names"]


def test_int8_training_reduces_l1(trained_8bit):
    _, log = trained_8bit
    print(f"\nint8 + AdamW8bit L1: {[round(v, 4) for v in log['losses']]}")
    assert log["losses"][-1] < 0.9 * log["losses"][0]


@pytest.mark.parametrize("which", ["trained", "trained_8bit"])
def test_refiner_state_round_trip_is_exact(which, request, batch, tmp_path):
    model, _ = request.getfixturevalue(which)
    params = P8 if which == "trained_8bit" else P
    torch.save(refiner_state(model), tmp_path / "refiner.pt")
    state = torch.load(tmp_path / "refiner.pt", weights_only=True)
    restored = load_refiner(params, state)
    model.eval()
    with torch.no_grad():
        expected, got = model(batch[0]), restored(batch[0])
    assert not torch.equal(expected, batch[0])  # trained: not the identity any more
    assert torch.equal(got, expected)
    with pytest.raises(GacError, match="does not match"):
        load_refiner(params.model_copy(update={"lora": LoraParams(rank=4)}), state)


def test_ckpt_path_loads_the_backbone_strictly(tmp_path):
    torch.manual_seed(3)
    source = build_backbone(P).state_dict()
    torch.save(source, tmp_path / "backbone.pt")
    torch.manual_seed(4)  # a different random init, overwritten by the file
    model = build_refiner(P.model_copy(update={"ckpt_path": str(tmp_path / "backbone.pt")}))
    state = model.backbone.state_dict()
    loaded = {k.replace(".base_layer", "").replace("proj.conv.", "proj."): v for k, v in state.items()
              if "lora_" not in k and "new_band_weight" not in k}  # fmt: skip
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_mismatching_ckpt_is_a_gac_error(tmp_path):
    torch.manual_seed(3)
    state = build_backbone(P).state_dict()
    state["extra.weight"] = state.pop("cls_token")
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(GacError, match=r"stage2\.ckpt_path: .* does not match"):
        build_refiner(P.model_copy(update={"ckpt_path": str(tmp_path / "other.pt")}))
    with pytest.raises(GacError, match=r"stage2\.ckpt_path: .* not found"):
        build_refiner(P.model_copy(update={"ckpt_path": str(tmp_path / "missing.pt")}))


def test_bad_backbone_or_targets_are_gac_errors():
    with pytest.raises(GacError, match=r"stage2\.backbone"):
        build_refiner(P.model_copy(update={"backbone": "prithvi_eo_v9"}))
    with pytest.raises(GacError, match=r"stage2\.lora\.target_modules"):
        build_refiner(P.model_copy(update={"lora": LoraParams(target_modules=r".*nothing\.here")}))
