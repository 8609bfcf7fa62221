"""TerraMind through TerraTorch's model registry: the Stage 1 generator (S1GRD → S2L2A).

Inputs are what TerraMind was pretrained on: S1GRD σ0 in dB ``[VV, VH]`` and S2L2A in DN, each standardised by
TerraMind's own pretraining mean/std (``standardize=True`` makes the model do it, and undo it on the output).
"""

from __future__ import annotations

import torch

from gac.config import Stage1Params
from gac.errors import GacError
from gac.models.checkpoints import load_state_dict


def build_generator(p: Stage1Params) -> torch.nn.Module:
    """Build ``p.variant`` (a ``terramind_v1_*_generate`` name) for S1GRD → S2L2A, with its weights.

    ``pretrained: true`` fetches the hub weights (TerraTorch downloads them); ``ckpt_path`` loads a local state dict
    strictly; neither gives random init (the *here* world).
    """
    from terratorch.registry import FULL_MODEL_REGISTRY

    name = p.variant.removeprefix("terratorch_")
    if not (name.startswith("terramind_v1_") and name.endswith("_generate")):
        raise GacError(f"stage1.variant: {p.variant!r} (expected terramind_v1_{{tiny,small,base,large}}_generate)")
    if name not in FULL_MODEL_REGISTRY:
        raise GacError(f"stage1.variant: {p.variant!r} is not in TerraTorch's FULL_MODEL_REGISTRY")
    model = FULL_MODEL_REGISTRY.build(
        name,
        modalities=["S1GRD"],
        output_modalities=["S2L2A"],
        pretrained=p.pretrained and not p.ckpt_path,
        standardize=True,
        timesteps=p.timesteps,
        img_size=p.img_size,
    )
    if p.ckpt_path:
        load_state_dict(model, p.ckpt_path, key="stage1.ckpt_path")
    return model.eval()
