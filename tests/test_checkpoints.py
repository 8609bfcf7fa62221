"""Released checkpoints: ``ckpt_path`` of every stage takes the files the models' authors publish, and a pre-filled
Hugging Face cache serves ``pretrained: true`` with ``HF_HUB_OFFLINE=1``.

No hub is reachable here, so the tests *write* files in the published layouts, derived from the code TerraTorch uses to
load the real ones (TerraTorch 1.2.11):

* ``TerraMind_v1_<size>.pt`` (repo ``ibm-esa-geospatial/TerraMind-1.0-<size>``, ``pretrained_weights`` in
  ``terramind_register.py``): TerraTorch loads it with ``checkpoint_filter_fn`` into a ``TerraMind`` and with
  ``checkpoint_filter_fn_generate`` (which prefixes ``sampler.model.``) into the generation model, so it is a plain
  ``TerraMind`` state dict. The model card lists the pretraining modalities; the file carries the embeddings of all of
  them at 224 px, so the test's file holds more modalities than GAC uses (S1RTC, DEM, LULC, NDVI too) at 224 px.
* ``TerraMind_Tokenizer_S2L2A.pt`` (``ibm-esa-geospatial/TerraMind-1.0-Tokenizer-S2L2A``, ``tokenizer_register.py``):
  loaded with ``strict=True`` into ``terramind_v1_tokenizer_s2l2a()``, so it is that DiVAE's state dict.
* ``Prithvi_EO_V2_<size>.pt`` (``ibm-nasa-geospatial/Prithvi-EO-2.0-<size>``, ``prithvi_vit.py``): the MAE checkpoint
  (``encoder.*``, ``decoder.*``) with the 6 HLS bands — TerraTorch's own ``PrithviMAE`` state dict, which its
  ``checkpoint_filter_fn_mae`` loads as is.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gac.config import Stage1Params, Stage2Params, Stage3Params
from gac.errors import GacError

S1 = Stage1Params(timesteps=1, img_size=128, device="cpu")
S2 = Stage2Params(img_size=128)
S3 = Stage3Params(img_size=128)
#: Prithvi-EO-2.0's six pretrained bands and where GAC's 12-band order puts them (gac.models.prithvi.BAND_NAMES).
HLS_POSITIONS = {"BLUE": 1, "GREEN": 2, "RED": 3, "NIR_NARROW": 8, "SWIR_1": 10, "SWIR_2": 11}


def released_terramind(variant: str = "terramind_v1_tiny") -> dict[str, torch.Tensor]:
    """A ``TerraMind`` state dict with more modalities than GAC uses, at the 224 px pretraining size."""
    from terratorch.models.backbones.terramind.model import terramind_register
    from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO
    from terratorch.models.backbones.terramind.model.terramind import (
        build_modality_embeddings,
        build_output_modality_embeddings,
    )

    from gac.models.grounding import registry_hyperparameters

    hp = registry_hyperparameters(variant)
    sizes = {"img_size": 224, "dim": hp["dim"]}
    enc, _ = build_modality_embeddings(MODALITY_INFO, ["S2L2A", "S1GRD", "S1RTC", "DEM"], **sizes)
    queries = ["S2L2A", "S1GRD", "S1RTC", "DEM", "LULC", "NDVI"]
    dec, _ = build_output_modality_embeddings(MODALITY_INFO, queries, **sizes)
    torch.manual_seed(11)
    model = terramind_register.build_terrammind_encdec(
        encoder_embeddings=enc, decoder_embeddings=dec, modality_info=MODALITY_INFO, **hp
    )
    return model.state_dict()


def released_tokenizer() -> dict[str, torch.Tensor]:
    """The S2L2A DiVAE's state dict, its zero-initialised layers given a default init (so loading is visible)."""
    from terratorch.models.backbones.terramind.tokenizer.tokenizer_register import terramind_v1_tokenizer_s2l2a

    torch.manual_seed(12)
    tokenizer = terramind_v1_tokenizer_s2l2a(pretrained=False)
    with torch.no_grad():
        for weight in tokenizer.parameters():
            if weight.dim() > 1 and not weight.any():
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return tokenizer.state_dict()


def released_prithvi(variant: str = "prithvi_eo_v2_tiny_tl") -> dict[str, torch.Tensor]:
    """TerraTorch's 6-band ``PrithviMAE`` state dict (encoder and decoder)."""
    from terratorch.registry import FULL_MODEL_REGISTRY

    torch.manual_seed(13)
    return FULL_MODEL_REGISTRY.build(f"{variant}_mae", pretrained=False, num_frames=1).state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three published files, written once."""
    folder = tmp_path_factory.mktemp("released")
    out = {
        "terramind": folder / "TerraMind_v1_tiny.pt",
        "tokenizer": folder / "TerraMind_Tokenizer_S2L2A.pt",
        "prithvi": folder / "Prithvi_EO_V2_tiny_TL.pt",
    }
    torch.save(released_terramind(), out["terramind"])
    torch.save(released_tokenizer(), out["tokenizer"])
    torch.save(released_prithvi(), out["prithvi"])
    return out


def test_stage1_takes_the_released_backbone_and_tokenizer(files: dict[str, Path]) -> None:
    from gac.models.terramind import build_generator

    released, tokenizer = torch.load(files["terramind"]), torch.load(files["tokenizer"])
    p = S1.model_copy(update={"ckpt_path": str(files["terramind"]), "tokenizer_ckpt_path": str(files["tokenizer"])})
    torch.manual_seed(0)  # another init than the files': only loading can make them equal
    state = build_generator(p).state_dict()
    sampler = {k.removeprefix("sampler.model."): v for k, v in state.items() if k.startswith("sampler.model.")}
    loaded = [k for k in sampler if "pos_emb" not in k]
    assert len(loaded) > 100 and all(torch.equal(sampler[k], released[k]) for k in loaded)
    assert sampler["encoder_embeddings.untok_sen1grd@224.pos_emb"].shape[1] == (128 // 16) ** 2  # rebuilt for 128 px
    tok = {k.removeprefix("tokenizer.tok_sen2l2a@224."): v for k, v in state.items() if k.startswith("tokenizer.")}
    assert tok.keys() == tokenizer.keys() and all(torch.equal(tok[k], tokenizer[k]) for k in tok)


def test_stage1_refuses_a_released_backbone_without_its_tokenizer(files: dict[str, Path]) -> None:
    from gac.models.terramind import build_generator

    with pytest.raises(GacError, match=r"^stage1\.tokenizer_ckpt_path: required") as err:
        build_generator(S1.model_copy(update={"ckpt_path": str(files["terramind"])}))
    assert "\n" not in str(err.value)


def test_stage2_takes_the_released_prithvi_mae_checkpoint(files: dict[str, Path]) -> None:
    from gac.models.prithvi import build_refiner

    released = torch.load(files["prithvi"])
    torch.manual_seed(0)
    model = build_refiner(S2.model_copy(update={"ckpt_path": str(files["prithvi"])}))
    state = model.backbone.state_dict()
    backbone = {k.replace(".base_layer", "").replace("proj.conv.", "proj."): v
                for k, v in state.items() if "lora_" not in k and "new_band" not in k}  # fmt: skip
    same = [k for k in backbone if k not in ("pos_embed", "patch_embed.proj.weight")]
    assert len(same) > 50 and all(torch.equal(backbone[k], released[f"encoder.{k}"]) for k in same)
    embed, source = backbone["patch_embed.proj.weight"], released["encoder.patch_embed.proj.weight"]
    assert embed.shape[1] == 12 and source.shape[1] == 6
    for i, position in enumerate(HLS_POSITIONS.values()):  # the six HLS bands land where GAC feeds them
        assert torch.equal(embed[:, position], source[:, i])


def test_stage3_takes_the_released_terramind_checkpoint(files: dict[str, Path]) -> None:
    from gac.models.grounding import build_grounder

    released = torch.load(files["terramind"])
    torch.manual_seed(0)
    model = build_grounder(S3.model_copy(update={"ckpt_path": str(files["terramind"])}))
    own = {k.replace(".base_layer", ""): v for k, v in model.encdec.state_dict().items() if "lora_" not in k}
    loaded = [k for k in own if "pos_emb" not in k]
    assert len(loaded) > 100 and all(torch.equal(own[k], released[k]) for k in loaded)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_a_file_of_another_variant_is_one_line(stage: str, files: dict[str, Path], tmp_path: Path) -> None:
    """Half of the weights missing (a damaged or other file) is refused, not silently left at random init."""
    from gac.models.grounding import build_grounder
    from gac.models.prithvi import build_refiner
    from gac.models.terramind import build_generator

    source = files["prithvi" if stage == "stage2" else "terramind"]
    state = torch.load(source)
    torch.save(dict(list(state.items())[: len(state) // 2]), tmp_path / "half.pt")
    build = {"stage1": build_generator, "stage2": build_refiner, "stage3": build_grounder}[stage]
    params = {"stage1": S1, "stage2": S2, "stage3": S3}[stage]
    update = {"ckpt_path": str(tmp_path / "half.pt")}
    if stage == "stage1":
        update["tokenizer_ckpt_path"] = str(files["tokenizer"])
    with pytest.raises(GacError, match=rf"^{stage}\.ckpt_path: .* does not match the model") as err:
        build(params.model_copy(update=update))
    assert "\n" not in str(err.value)


OFFLINE_SCRIPT = """
import torch
from gac.config import Stage1Params, Stage2Params, Stage3Params
from gac.models.grounding import build_grounder
from gac.models.prithvi import build_refiner
from gac.models.terramind import build_generator
released = {name: torch.load(path) for name, path in %(files)r.items()}
gen = build_generator(Stage1Params(img_size=128, timesteps=1, pretrained=True)).state_dict()
tok = released["tokenizer"]
assert all(torch.equal(gen["tokenizer.tok_sen2l2a@224." + k], v) for k, v in tok.items())
tm = released["terramind"]
assert torch.equal(gen["sampler.model.decoder.0.cross_attn.q.weight"], tm["decoder.0.cross_attn.q.weight"])
ref = build_refiner(Stage2Params(img_size=128, pretrained=True))
pr = released["prithvi"]
assert torch.equal(ref.backbone.blocks[0].attn.qkv.base_layer.weight, pr["encoder.blocks.0.attn.qkv.weight"])
grd = build_grounder(Stage3Params(img_size=128, pretrained=True))
assert torch.equal(grd.encdec.encoder[0].mlp.fc1.weight, tm["encoder.0.mlp.fc1.weight"])
print("loaded from the offline cache")
"""


def test_pretrained_true_reads_a_prefilled_hub_cache_offline(files: dict[str, Path], tmp_path: Path) -> None:
    """``pretrained: true`` with ``HF_HUB_OFFLINE=1`` and the files in Hugging Face's cache layout
    (``models--<org>--<repo>/snapshots/<commit>/<file>`` + ``refs/main``): all three stages load them, nothing is
    downloaded (there is no hub here: any attempt would fail)."""
    cache = tmp_path / "hub"
    repos = {
        "terramind": "ibm-esa-geospatial/TerraMind-1.0-tiny",
        "tokenizer": "ibm-esa-geospatial/TerraMind-1.0-Tokenizer-S2L2A",
        "prithvi": "ibm-nasa-geospatial/Prithvi-EO-2.0-tiny-TL",
    }
    commit = "0" * 40
    for name, repo in repos.items():
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
        (folder / "snapshots" / commit).mkdir(parents=True)
        (folder / "snapshots" / commit / files[name].name).symlink_to(files[name])
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    script = OFFLINE_SCRIPT % {"files": {k: str(v) for k, v in files.items()}}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded from the offline cache" in done.stdout
