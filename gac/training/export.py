"""A trained stage as a self-describing folder: ``weights.safetensors`` + ``params.json``.

Safetensors holds tensors only, so loading a model never unpickles code (the safe path the registry and ``gac infer``
use). ``params.json`` names the stage and its whole ``params.yaml`` section, which is all :func:`load_model` needs to
rebuild the network through the same builders training used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gac.errors import GacError
from gac.io.atomic import atomic_path, read_json
from gac.pipeline import trained_model
from gac.training.stages import TRAINED_STAGES

WEIGHTS = "weights.safetensors"
PARAMS = "params.json"


def save_model(stage: str, section: Any, model: torch.nn.Module, folder: str | Path) -> Path:
    """Write the model folder atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in TRAINED_STAGES[stage].state(model).items()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(state, tmp / WEIGHTS)
        (tmp / PARAMS).write_text(json.dumps({"stage": stage, "section": section.model_dump()}, indent=2))
    return Path(folder)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[str, Any, torch.nn.Module]:
    """Rebuild ``(stage, section, model)`` on ``device`` from a model folder (tensors only: nothing is unpickled)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / PARAMS).is_file():
        raise GacError(f"{folder}: not a GAC model folder (expected {WEIGHTS} and {PARAMS})")
    meta = read_json(folder / PARAMS, "the model's stage and parameters")
    if meta.get("stage") not in TRAINED_STAGES:
        raise GacError(f"{folder / PARAMS}: stage {meta.get('stage')!r} (expected one of {sorted(TRAINED_STAGES)})")
    spec = TRAINED_STAGES[meta["stage"]]
    section = spec.params.model_validate(meta["section"])
    model = spec.load(section, load_file(folder / WEIGHTS), device)
    return meta["stage"], section, model.eval()


def _inputs(stage: str, s1_db: torch.Tensor, opt_refl: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the stage's network takes: Stage 2 refines the optical alone, Stage 3 also sees the SAR."""
    return (s1_db, opt_refl) if trained_model(stage).sees_sar else (opt_refl,)


def apply(stage: str, model: torch.nn.Module, s1_db: torch.Tensor, opt_refl: torch.Tensor) -> torch.Tensor:
    """Run a stage's network on a batch; the refined optical (the mean, where the model also predicts σ).

    The output is clipped to valid reflectance ``[0, 1]``: a residual may overshoot, and no caller (caches, the
    registry's pyfunc model, sweeps) should hand out a negative reflectance. Training losses see the raw output.
    """
    return model(*_inputs(stage, s1_db, opt_refl)).clamp(0.0, 1.0)


def has_sigma(model: torch.nn.Module) -> bool:
    """Whether ``model`` predicts σ (it was trained with ``nll_weight > 0``)."""
    return getattr(model, "sigma_head", None) is not None


def apply_with_sigma(
    stage: str, model: torch.nn.Module, s1_db: torch.Tensor, opt_refl: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`apply`'s mean and the calibrated σ of the reflectance (the head's σ times its fitted per-band
    temperature), or ``None`` for a model without a σ head. σ is not clipped: it describes the unclipped Gaussian."""
    if not has_sigma(model):
        return apply(stage, model, s1_db, opt_refl), None
    mean, log_var = model.distribution(*_inputs(stage, s1_db, opt_refl))
    return mean.clamp(0.0, 1.0), model.sigma_head.sigma(log_var)


def pyfunc_output(stage: str, model: torch.nn.Module, s1_db: torch.Tensor, opt_refl: torch.Tensor) -> Any:
    """What a registered model returns (and its signature describes): the refined optical as a float32 array
    ``(N, 12, H, W)`` of reflectance, or, for a model with a σ head, ``{"opt": that array, "sigma": its calibrated σ}``
    (the keys of the cache, :data:`gac.inference.engine.SIGMA`). Without a σ head the output is what it always was,
    so existing callers of a registered model without σ see no change."""
    with torch.inference_mode():
        mean, sigma = apply_with_sigma(stage, model, s1_db, opt_refl)
    if sigma is None:
        return mean.float().numpy()
    return {"opt": mean.float().numpy(), "sigma": sigma.float().numpy()}
