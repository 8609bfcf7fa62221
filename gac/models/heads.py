"""The pixel decoder both trained stages share: ViT tokens + a full-resolution guide image → a per-pixel residual.

A ViT sees the image as 16×16 patch tokens. The obvious head — one linear layer per token that writes that token's
16·16·C pixels — has no receptive field across token borders, so whatever it adds repeats with the token grid: GAC's
first heads did exactly that, and what Stage 3 added to opt_v2 correlated 1.000 with itself shifted by 16 px (see
:func:`gac.evaluation.metrics.block_periodicity`). TerraTorch's decoders (UperNet, UNet, FCN) assume a feature pyramid
or end
at token scale; the refiners need little more than a smooth, token-free upsampling that can be combined with
pixel detail, so this head is written here:

1. ``reduce``: 1×1 conv, token features → ``width`` channels, on the token grid;
2. **bilinear upsampling** of that grid to full resolution: every pixel blends its four nearest token centres, so the
   field is continuous across token borders (no blocks by construction);
3. ``fuse``: two 3×3 convs over [upsampled token features, guide] at full resolution — the guide (the standardised
   input image, and for Stage 3 the SAR) supplies the pixel-scale detail a token cannot;
4. ``out``: a 1×1 conv over [fused features, guide] — the guide enters again directly, so a per-pixel linear band
   correction (gain and offset, the commonest error of a generated image) is one layer away — to the output
   channels, whose weights and bias start at **zero**, so an untrained stage is
   the identity (its residual is 0) and cannot start worse than its input. (1×1 keeps the fan-in small: Adam's
   first steps move every weight by about the learning rate, and a 3×3 layer's nine times larger fan-in overshot.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Channels of the head's full-resolution features.
HEAD_WIDTH = 32


class TokenPixelDecoder(nn.Module):
    """``(tokens (B, N, dim) on a square grid, guide (B, guide_channels, H, W))`` → ``(B, out_channels, H, W)``.

    Args:
        dim: token width of the transformer.
        guide_channels: channels of the full-resolution guide image.
        out_channels: channels of the output (the residual).
        width: feature channels at full resolution.
    """

    def __init__(self, dim: int, guide_channels: int, out_channels: int, width: int = HEAD_WIDTH) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, width, 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(width + guide_channels, width, 3, padding=1, padding_mode="reflect"),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"),
            nn.GELU(),
        )
        self.out = nn.Conv2d(width + guide_channels, out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: Tensor, guide: Tensor) -> Tensor:
        """``tokens`` in row-major patch order (no cls token); ``guide`` at the output resolution."""
        batch, n, dim = tokens.shape
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"expected a square token grid, got {n} tokens")
        f = self.reduce(tokens.transpose(1, 2).reshape(batch, dim, grid, grid))
        f = F.interpolate(f, size=guide.shape[-2:], mode="bilinear", align_corners=False)
        guide = guide.to(f.dtype)
        return self.out(torch.cat([self.fuse(torch.cat([f, guide], dim=1)), guide], dim=1))
