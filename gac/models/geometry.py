"""Exact geometry between the 120 px BigEarthNet tile and the square input a ViT takes.

TerraMind and Prithvi embed 16 px patches (TerraMind's tokenizers need multiples of 32 here), so a 120 px tile must
be brought to e.g. 128 or 224 px and back. GAC *reflect-pads symmetrically* and *centre-crops* the same margins:
pixels keep their 10 m size (no resampling, which would change the GSD the models were pretrained on) and every pixel
returns exactly where it started. (An earlier implementation padded right/bottom only and cropped from the centre,
shifting every output by half the padding.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margins(size: int, target: int) -> tuple[int, int]:
    """Padding (before, after) that centres ``size`` pixels in ``target`` (the odd pixel goes after)."""
    if target < size:
        raise ValueError(f"model input size {target} is smaller than the tile ({size})")
    before = (target - size) // 2
    return before, target - size - before


def pad_to(x: torch.Tensor, target: int) -> torch.Tensor:
    """Reflect-pad the last two axes of ``x`` (B, C, H, W) symmetrically to ``target``×``target``."""
    top, bottom = margins(x.shape[-2], target)
    left, right = margins(x.shape[-1], target)
    if max(top, bottom, left, right) >= min(x.shape[-2:]):  # reflect needs a margin smaller than the tile
        return F.pad(x, (left, right, top, bottom), mode="replicate")
    return F.pad(x, (left, right, top, bottom), mode="reflect")


def crop_from(x: torch.Tensor, size: int) -> torch.Tensor:
    """Undo :func:`pad_to`: take the ``size``×``size`` window the tile was padded from."""
    top, _ = margins(size, x.shape[-2])
    left, _ = margins(size, x.shape[-1])
    return x[..., top : top + size, left : left + size]
