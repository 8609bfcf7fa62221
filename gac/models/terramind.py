"""TerraMind through TerraTorch's model registry: the Stage 1 generator (S1GRD → S2L2A).

Inputs are what TerraMind was pretrained on: S1GRD σ0 in dB ``[VV, VH]`` and S2L2A in DN, each standardised by
TerraMind's own pretraining mean/std (``standardize=True`` makes the model do it, and undo it on the output).
"""

from __future__ import annotations

import torch

from gac.config import Stage1Params
from gac.errors import GacError
from gac.models.backend import uses_terratorch
from gac.models.checkpoints import load_published, load_state_dict, read_state_dict

#: Where TerraMind's encoder-decoder sits in the generation model, and the S2L2A tokenizer's key.
SAMPLER = "sampler.model."
TOKENIZER = "tok_sen2l2a@224"


@uses_terratorch
def build_generator(p: Stage1Params) -> torch.nn.Module:
    """Build ``p.variant`` (a ``terramind_v1_*_generate`` name) for S1GRD → S2L2A, with its weights.

    * ``pretrained: true`` and no local file: TerraTorch fetches the backbone and the S2L2A tokenizer from the
      Hugging Face hub (or a pre-filled hub cache with ``HF_HUB_OFFLINE=1``).
    * ``ckpt_path``: the released ``TerraMind_v1_<size>.pt`` (a ``TerraMind`` state dict; mapped with TerraTorch's
      ``checkpoint_filter_fn_generate``) or a state dict of this whole GAC model (keys ``sampler.model.*`` and
      ``tokenizer.*``, loaded strictly).
    * ``tokenizer_ckpt_path``: the released ``TerraMind_Tokenizer_S2L2A.pt``. With a released backbone file the
      tokenizer comes from here, or from the hub when ``pretrained: true``; it is never left at random init silently.
    * nothing: random init (the *here* world).
    """
    from terratorch.registry import FULL_MODEL_REGISTRY

    name = p.variant.removeprefix("terratorch_")
    if not (name.startswith("terramind_v1_") and name.endswith("_generate")):
        raise GacError(f"stage1.variant: {p.variant!r} (expected terramind_v1_{{tiny,small,base,large}}_generate)")
    if name not in FULL_MODEL_REGISTRY:
        raise GacError(f"stage1.variant: {p.variant!r} is not in TerraTorch's FULL_MODEL_REGISTRY")
    local = bool(p.ckpt_path or p.tokenizer_ckpt_path)
    model = FULL_MODEL_REGISTRY.build(
        name,
        modalities=["S1GRD"],
        output_modalities=["S2L2A"],
        pretrained=p.pretrained and not local,
        standardize=True,
        timesteps=p.timesteps,
        img_size=p.img_size,
    )
    if local:
        _load_local(model, p)
    return model.eval()


@uses_terratorch
def _load_local(model: torch.nn.Module, p: Stage1Params) -> None:
    """Load ``stage1.ckpt_path`` / ``stage1.tokenizer_ckpt_path`` (see :func:`build_generator`)."""
    from terratorch.models.backbones.terramind.model.terramind_register import checkpoint_filter_fn_generate

    whole = False
    if p.ckpt_path:
        state_keys = read_state_dict(p.ckpt_path, "stage1.ckpt_path").keys()
        whole = any(k.startswith(SAMPLER) for k in state_keys)
        if whole:  # GAC's own layout: the whole generator, tokenizer included
            load_state_dict(model, p.ckpt_path, key="stage1.ckpt_path")
        else:
            load_published(
                model,
                p.ckpt_path,
                "stage1.ckpt_path",
                checkpoint_filter_fn_generate,
                source_key=lambda k: k.removeprefix(SAMPLER),
                skip=("tokenizer.",),
            )
    tokenizer = model.tokenizer[TOKENIZER]
    if p.tokenizer_ckpt_path:
        load_state_dict(tokenizer, p.tokenizer_ckpt_path, key="stage1.tokenizer_ckpt_path")
    elif not whole and p.pretrained:
        from huggingface_hub import hf_hub_download
        from terratorch.models.backbones.terramind.tokenizer.tokenizer_register import pretrained_weights

        hub = pretrained_weights["terramind_v1_tokenizer_s2l2a"]
        path = hf_hub_download(repo_id=hub["hf_hub_id"], filename=hub["hf_hub_filename"])
        load_state_dict(tokenizer, path, key="stage1.tokenizer (hub)")
    elif not whole:
        raise GacError(
            "stage1.tokenizer_ckpt_path: required with a released TerraMind checkpoint in stage1.ckpt_path (the "
            "S2L2A tokenizer is a separate file, TerraMind_Tokenizer_S2L2A.pt from "
            "ibm-esa-geospatial/TerraMind-1.0-Tokenizer-S2L2A), or set stage1.pretrained: true to fetch it"
        )
