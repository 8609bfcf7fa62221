"""Loading local weights safely and strictly.

TerraTorch's ``ckpt_path`` loads with ``strict=False`` and only *warns* about missing keys, so a checkpoint of the
wrong variant would silently leave most of a model at random init. GAC loads local state dicts itself, with
``weights_only=True`` (no pickled code runs) and ``strict=True`` (a mismatch is one clear error line).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gac.errors import GacError


def load_state_dict(model: torch.nn.Module, path: str | Path, key: str = "ckpt_path") -> None:
    """Load the state dict at ``path`` into ``model`` strictly; ``key`` names the parameter for the error line."""
    path = Path(path)
    if not path.is_file():
        raise GacError(f"{key}: {path} not found (expected a local state-dict file saved with torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle that weights_only refuses
        raise GacError(f"{key}: {path} is not a loadable state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same keys, other shapes (another variant, another band layout)
        first = str(e).strip().splitlines()[-1].strip()
        raise GacError(f"{key}: {path} does not match the model ({first})") from None
    if result.missing_keys or result.unexpected_keys:
        raise GacError(
            f"{key}: {path} does not match the model ({len(result.missing_keys)} missing keys, e.g. "
            f"{result.missing_keys[:2]}; {len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:2]})"
        )
