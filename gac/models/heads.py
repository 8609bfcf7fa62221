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

:class:`LogVarianceHead` is the optional aleatoric branch (``stage2/3.nll_weight > 0``): a per-pixel, per-band
log-variance from the decoder's fused features **detached** and the guide. Detached, because the Gaussian NLL must
not be able to trade the mean's accuracy for a better variance (a shared trunk would be pulled towards features that
explain noise); so the mean prediction trains exactly as without the branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Channels of the head's full-resolution features.
HEAD_WIDTH = 32


def fuse_convs(in_channels: int, width: int) -> nn.Sequential:
    """Two 3×3 convs with GELU at full resolution (reflect padding: no dark frame at the tile border)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, padding_mode="reflect"),
        nn.GELU(),
        nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"),
        nn.GELU(),
    )


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1×1 conv whose weights and bias start at zero: a head that starts as "no change" (see the module doc)."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


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
        self.fuse = fuse_convs(width + guide_channels, width)
        self.out = zero_conv(width + guide_channels, out_channels)

    def forward(self, tokens: Tensor, guide: Tensor) -> Tensor:
        """``tokens`` in row-major patch order (no cls token); ``guide`` at the output resolution."""
        return self.out(torch.cat(self.features(tokens, guide), dim=1))

    def features(self, tokens: Tensor, guide: Tensor) -> tuple[Tensor, Tensor]:
        """The fused full-resolution features and the guide (in their dtype) that :attr:`out` projects."""
        batch, n, dim = tokens.shape
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"expected a square token grid, got {n} tokens")
        f = self.reduce(tokens.transpose(1, 2).reshape(batch, dim, grid, grid))
        f = F.interpolate(f, size=guide.shape[-2:], mode="bilinear", align_corners=False)
        guide = guide.to(f.dtype)
        return self.fuse(torch.cat([f, guide], dim=1)), guide


#: Range of the predicted log-variance in standardised units (σ from e⁻⁸ ≈ 3·10⁻⁴ to e² ≈ 7 band stds): keeps the
#: NLL finite on a pixel the mean predicts exactly and a wild first step from an overflowing ``exp``.
LOG_VAR_RANGE = (-16.0, 4.0)


class LogVarianceHead(nn.Module):
    """``(features (B, width, H, W), guide (B, guide_channels, H, W))`` → log-variance ``(B, out_channels, H, W)``.

    The same shape as :class:`TokenPixelDecoder`'s full-resolution part (two 3×3 convs, then a 1×1 over [features,
    guide]) on features the caller detaches. Its last conv starts at zero, so an untrained head predicts log σ² = 0
    (one band std) everywhere: a constant σ, which carries no ranking until the NLL has trained it.
    """

    def __init__(self, guide_channels: int, out_channels: int, width: int = HEAD_WIDTH) -> None:
        super().__init__()
        self.body = fuse_convs(width + guide_channels, width)
        self.out = zero_conv(width + guide_channels, out_channels)

    def forward(self, features: Tensor, guide: Tensor) -> Tensor:
        x = torch.cat([features, guide], dim=1)
        return self.out(torch.cat([self.body(x), guide], dim=1)).clamp(*LOG_VAR_RANGE)


class SigmaHead(nn.Module):
    """A refiner's σ branch: :class:`LogVarianceHead` plus the per-band ``temperature`` calibration fitted after
    training (:func:`gac.evaluation.uncertainty.fit_temperature`).

    The temperature is a buffer, so it travels in every state dict — the exported weights, the registered model and
    whatever writes a cache — and ones (no calibration) until the fit sets it.
    """

    def __init__(self, guide_channels: int, bands: int, width: int = HEAD_WIDTH) -> None:
        super().__init__()
        self.log_var = LogVarianceHead(guide_channels, bands, width)
        self.register_buffer("temperature", torch.ones(bands))

    def forward(self, features: Tensor, guide: Tensor) -> Tensor:
        """Log-variance in the units of the decoder's output, from features whose gradient stops here."""
        return self.log_var(features.detach(), guide)

    def sigma(self, log_var: Tensor) -> Tensor:
        """Calibrated σ, ``exp(log_var / 2) · temperature`` per band, in the units ``log_var`` is in."""
        return torch.exp(0.5 * log_var) * self.temperature.view(1, -1, 1, 1).to(log_var.dtype)
