"""Image-quality metrics for SAR → optical translation, on one data-range convention.

Every metric here takes Sentinel-2 L2A digital numbers (``DN = reflectance × 10000``, the 12 bands of
:data:`gac.sensors.S2_BANDS` in that order) as torch tensors shaped ``(B, C, H, W)`` and first maps them through
:func:`to_reflectance`: ``DN / 10000`` clipped to ``[0, 1]``, float32. All range-dependent metrics (PSNR, SSIM,
MS-SSIM, LPIPS) then use ``data_range = 1.0``. One convention, written down once, is what makes numbers comparable
between stages, runs and papers: PSNR computed on raw DN with ``data_range = 10000`` or on a per-image min–max range
gives different values for the same prediction.

Direction of each metric (the keys of :func:`per_tile` and :func:`compute_all`):

============  ==================  ======================================================================
key           better              what it is
============  ==================  ======================================================================
``psnr``      higher              dB, per tile over all bands, capped at :data:`PSNR_MAX_DB`
``ssim``      higher              Gaussian SSIM (window 11, σ 1.5, K1 0.01, K2 0.03), 5-px border dropped
``ms_ssim``   higher              3-scale MS-SSIM (120 → 60 → 30 px), same window, betas renormalised
``sam_deg``   lower               spectral angle in degrees, mean over pixels
``mae``       lower               mean absolute reflectance error
``rmse``      lower               root mean squared reflectance error (per tile)
``ndvi_err``  lower               mean ``|NDVI_pred − NDVI_target|`` from B08 and B04
``sar_edge``  lower               :func:`sar_edge_agreement`, in ``[0, 1]``; 0 = the real edges where SAR has edges
``lpips``     lower               LPIPS on the RGB bands (only when a :func:`lpips_metric` is given)
============  ==================  ======================================================================

Library code is used wherever a library has the metric (torchmetrics for PSNR, SSIM, MS-SSIM and SAM, the ``lpips``
package for LPIPS); only the SAR-edge agreement, block periodicity, NDVI error and per-tile MAE/RMSE are written here.

``import gac.evaluation.metrics`` imports only torch: torchmetrics (whose package import alone takes ~10 s, as it pulls
in its
audio, text and torchvision-based metrics) is imported by the first metric call, and ``lpips`` by
:func:`lpips_metric`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gac.errors import GacError
from gac.sensors import DN_SCALE, S1_BANDS, S2_BANDS

__all__ = ["DN_SCALE"]  # re-exported: metrics are defined on DN / DN_SCALE
#: The one data range of every range-dependent metric: reflectance in ``[0, 1]``.
DATA_RANGE = 1.0
#: SSIM constants of Wang et al. (2004), as in scikit-image and torchmetrics.
SSIM_SIGMA = 1.5
SSIM_KERNEL = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: MS-SSIM exponents: the first three of Wang et al. (2003) ``(0.0448, 0.2856, 0.3001)`` renormalised to sum to 1.
#: Five scales would need ≥ 176 px for an 11-px window at the coarsest scale; 120-px tiles support three
#: (120, 60, 30 px), and renormalising keeps MS-SSIM = 1 for a perfect prediction and on the same footing as SSIM.
MS_SSIM_BETAS: tuple[float, ...] = tuple(b / (0.0448 + 0.2856 + 0.3001) for b in (0.0448, 0.2856, 0.3001))
#: PSNR cap: a tile predicted exactly would otherwise give ``inf`` and poison the mean over a test split.
PSNR_MAX_DB = 100.0
#: Fixed dB windows of :func:`sar_to_unit` (VV, VH), the clip ranges common in SAR → optical work (e.g. DSen2-CR).
SAR_DB_RANGE: dict[str, tuple[float, float]] = {"VV": (-25.0, 0.0), "VH": (-32.5, 0.0)}
#: Box-filter size that suppresses speckle before SAR edges are taken (see :func:`sar_edge_agreement`).
SAR_EDGE_BOX = 5
#: Border (px) ignored by :func:`sar_edge_agreement`: the box and Sobel filters see reflect padding there.
SAR_EDGE_BORDER = 2
#: Keeps ``sqrt`` differentiable at zero gradient and divisions finite on flat tiles.
_EPS = 1e-8
#: Denominator guard of NDVI (in reflectance units) so that black pixels give NDVI 0 instead of NaN.
NDVI_EPS = 1e-6

_B02, _B03, _B04, _B08 = (S2_BANDS.index(b) for b in ("B02", "B03", "B04", "B08"))
_RGB = (_B04, _B03, _B02)
_LUMINANCE_BANDS = (_B02, _B03, _B04, _B08)

# --------------------------------------------------------------------------------------------------- conventions


def to_reflectance(dn: Tensor) -> Tensor:
    """Map Sentinel-2 L2A DN to reflectance: ``DN / 10000`` clipped to ``[0, 1]``, float32.

    This is the single data-range convention of the module (``data_range = 1.0``). Clipping matters: L2A DN can
    exceed 10000 over snow, clouds and specular targets, and a model can emit negatives; without a fixed range PSNR
    and SSIM would silently depend on each tile's extremes.

    Args:
        dn: DN of any shape and numeric dtype (uint16 from the files, or float from a model).

    Returns:
        Reflectance in ``[0, 1]`` as float32, same shape.
    """
    return (torch.as_tensor(dn).to(torch.float32) / DN_SCALE).clamp(0.0, 1.0)


def sar_to_unit(s1_db: Tensor) -> Tensor:
    """Map Sentinel-1 backscatter in dB (VV, VH) to ``[0, 1]`` with fixed per-polarisation windows.

    The windows (:data:`SAR_DB_RANGE`: VV −25…0 dB, VH −32.5…0 dB) are fixed rather than per tile so that a value
    means the same backscatter in every tile. Not needed by the metrics (the SAR-edge agreement is scale-free) but
    kept here as the companion of :func:`to_reflectance` for displays and model inputs.

    Args:
        s1_db: ``(B, 2, H, W)`` backscatter in dB, channels in :data:`gac.sensors.S1_BANDS` order.

    Returns:
        float32 tensor of the same shape in ``[0, 1]``.
    """
    s1_db = torch.as_tensor(s1_db).to(torch.float32)
    _check_s1(s1_db)
    lo = torch.tensor([SAR_DB_RANGE[b][0] for b in S1_BANDS], device=s1_db.device).view(1, -1, 1, 1)
    hi = torch.tensor([SAR_DB_RANGE[b][1] for b in S1_BANDS], device=s1_db.device).view(1, -1, 1, 1)
    return ((s1_db - lo) / (hi - lo)).clamp(0.0, 1.0)


def _check_pair(pred: Tensor, target: Tensor) -> None:
    """Reject inputs that would make a metric silently wrong (broadcasting, missing bands)."""
    if pred.shape != target.shape:
        raise GacError(f"metrics: prediction shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
    if pred.ndim != 4 or pred.shape[1] != len(S2_BANDS):
        raise GacError(f"metrics: expected (B, {len(S2_BANDS)}, H, W) Sentinel-2 tensors, got {tuple(pred.shape)}")


def _check_s1(s1_db: Tensor, like: Tensor | None = None) -> None:
    """Reject a SAR tensor that is not ``(B, 2, H, W)`` or does not line up with the optical one."""
    if s1_db.ndim != 4 or s1_db.shape[1] != len(S1_BANDS):
        raise GacError(f"metrics: expected (B, {len(S1_BANDS)}, H, W) Sentinel-1 dB tensor, got {tuple(s1_db.shape)}")
    if like is not None and (s1_db.shape[0] != like.shape[0] or s1_db.shape[2:] != like.shape[2:]):
        raise GacError(
            f"metrics: Sentinel-1 tensor {tuple(s1_db.shape)} does not match optical tensor {tuple(like.shape)}"
        )


# ----------------------------------------------------------------------------------------- per-tile metrics
# All take reflectance (B, 12, H, W) in [0, 1] and return one value per tile, shape (B,).


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB per tile over all bands and pixels (higher is better), ``data_range = 1``, capped at 100 dB.

    Computed per tile (not on the pooled MSE of a batch) so that averaging over a test split weights every tile
    equally, which is what "average PSNR" means in the literature.

    Args:
        pred: predicted reflectance ``(B, C, H, W)``.
        target: reference reflectance, same shape.

    Returns:
        ``(B,)`` PSNR values.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    value = peak_signal_noise_ratio(pred, target, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    return value.clamp(max=PSNR_MAX_DB)


def _ssim_window() -> dict:
    """The window and constants every SSIM-family metric here shares (torchmetrics keyword names)."""
    return {"gaussian_kernel": True, "sigma": SSIM_SIGMA, "kernel_size": SSIM_KERNEL, "data_range": DATA_RANGE,
            "k1": SSIM_K1, "k2": SSIM_K2}  # fmt: skip


def ssim_map(pred: Tensor, target: Tensor) -> Tensor:
    """Full SSIM map from torchmetrics (Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, ``data_range = 1``).

    torchmetrics reflect-pads the images by the window radius (5 px) so the map has the input's size; the values in
    the outer 5 px therefore depend on the padding.

    Args:
        pred: predicted reflectance ``(B, C, H, W)``.
        target: reference reflectance, same shape.

    Returns:
        ``(B, C, H, W)`` local SSIM.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(
        pred,
        target,
        reduction="none",
        **_ssim_window(),
        return_full_image=True,
    )
    return full


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM per tile (higher is better, 1 = identical).

    Gaussian window of 11 taps with σ = 1.5, K1 = 0.01, K2 = 0.03, population covariance, ``data_range = 1``, the
    constants of Wang et al. (2004). The mean is over the interior only (a 5-px border, the window radius, is
    dropped), as in Wang's reference code and scikit-image: there the window lies wholly inside the tile, so the value
    does not depend on how the border is padded. (torchmetrics' own mean includes the reflect-padded border and so
    differs slightly; its full map is used here and cropped.)

    Args:
        pred: predicted reflectance ``(B, C, H, W)``.
        target: reference reflectance, same shape.

    Returns:
        ``(B,)`` SSIM values averaged over bands and interior pixels.
    """
    pad = (SSIM_KERNEL - 1) // 2
    return ssim_map(pred, target)[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))


def ms_ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Three-scale MS-SSIM per tile (higher is better, 1 = identical), torchmetrics implementation.

    Same window and constants as :func:`ssim`; scales 120, 60 and 30 px with exponents :data:`MS_SSIM_BETAS`.
    The standard five scales need tiles of at least 176 px (and pytorch_msssim refuses < 160 px), so a 120-px tile
    gets three. Negative contrast terms are clipped at 0 (torchmetrics ``normalize="relu"``) because a fractional
    power of a negative number is NaN.

    Args:
        pred: predicted reflectance ``(B, C, H, W)``, at least 44 px on each side.
        target: reference reflectance, same shape.

    Returns:
        ``(B,)`` MS-SSIM values.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    return multiscale_structural_similarity_index_measure(
        pred,
        target,
        reduction="none",
        **_ssim_window(),
        betas=MS_SSIM_BETAS,
        normalize="relu",
    )


def sam_deg(pred: Tensor, target: Tensor) -> Tensor:
    """Spectral angle in degrees, mean over the pixels of each tile (lower is better, 0 = same spectral shape).

    torchmetrics' spectral angle mapper gives the per-pixel angle ``arccos(<p, t> / (|p| |t|))`` in radians; it is
    converted to degrees because that is how SAM is reported. A pixel whose spectrum is all zero has no direction
    (torchmetrics gives NaN): it counts as 90°, the largest angle between non-negative spectra, when only one of the
    two is zero, and as 0° when both are, so that a model cannot lower SAM by predicting black.

    Args:
        pred: predicted reflectance ``(B, C, H, W)``.
        target: reference reflectance, same shape.

    Returns:
        ``(B,)`` mean angles in degrees.
    """
    from torchmetrics.functional.image import spectral_angle_mapper

    # float64: in float32, arccos of a cosine rounded to 0.99999994 is already 0.02°, so identical spectra scored > 0.
    angle = spectral_angle_mapper(pred.double(), target.double(), reduction="none")  # (B, H, W) radians
    zero_p = pred.abs().sum(dim=1) == 0
    zero_t = target.abs().sum(dim=1) == 0
    angle = torch.where(zero_p | zero_t, torch.full_like(angle, math.pi / 2), angle)
    angle = torch.where(zero_p & zero_t, torch.zeros_like(angle), angle)
    return torch.rad2deg(angle).mean(dim=(1, 2)).to(pred.dtype)


def mae(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute reflectance error per tile (lower is better).

    Written out because torchmetrics' functional MAE reduces over the whole batch and a per-tile value is needed.

    Args:
        pred: predicted reflectance ``(B, C, H, W)``.
        target: reference reflectance, same shape.

    Returns:
        ``(B,)`` values in reflectance units.
    """
    return (pred - target).abs().mean(dim=(1, 2, 3))


def rmse(pred: Tensor, target: Tensor) -> Tensor:
    """Root mean squared reflectance error per tile (lower is better); the split value is the mean of tile RMSEs.

    Args:
        pred: predicted reflectance ``(B, C, H, W)``.
        target: reference reflectance, same shape.

    Returns:
        ``(B,)`` values in reflectance units.
    """
    return (pred - target).pow(2).mean(dim=(1, 2, 3)).sqrt()


def ndvi(refl: Tensor) -> Tensor:
    """NDVI ``(B08 − B04) / (B08 + B04 + 1e-6)`` from 12-band reflectance; the guard makes black pixels 0.

    Args:
        refl: reflectance ``(B, 12, H, W)``.

    Returns:
        ``(B, H, W)`` NDVI in ``[-1, 1]``.
    """
    nir, red = refl[:, _B08], refl[:, _B04]
    return (nir - red) / (nir + red + NDVI_EPS)


def ndvi_err(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute NDVI difference per tile (lower is better, in NDVI units, at most 2).

    NDVI is the quantity most downstream users compute from S2; a prediction can have good PSNR and still get the
    red/NIR ratio wrong, which this catches.

    Args:
        pred: predicted reflectance ``(B, 12, H, W)``.
        target: reference reflectance, same shape.

    Returns:
        ``(B,)`` values.
    """
    return (ndvi(pred) - ndvi(target)).abs().mean(dim=(1, 2))


# ------------------------------------------------------------------------------------------- SAR-edge agreement


def _box_filter(x: Tensor, size: int) -> Tensor:
    """Mean filter with reflect padding, same size out; ``x`` is ``(B, 1, H, W)``."""
    pad = size // 2
    return F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), size, stride=1)


def _sobel_magnitude(x: Tensor) -> Tensor:
    """Sobel gradient magnitude ``sqrt(gx² + gy² + eps)`` with reflect padding; ``x`` is ``(B, 1, H, W)``.

    The eps keeps the gradient of ``sqrt`` finite where the image is flat.
    """
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernel = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel)
    return (g.pow(2).sum(dim=1, keepdim=True) + _EPS).sqrt()


def sar_edge_agreement(
    optical_refl: Tensor, target_refl: Tensor, s1_db: Tensor, reduction: Literal["none", "mean"] = "none"
) -> Tensor:
    """How wrong the optical edges are where the SAR sees edges: 0 = the real image's edges exactly, 1 = none of them.

    Lower is better; the real Sentinel-2 tile scores exactly 0, so a perfect model meets any target. A SAR → optical
    model should put field and parcel boundaries where the radar sees them, with the contrast the real scene has
    there; PSNR and SSIM weigh every pixel alike and cannot tell whether a blurry or hallucinated boundary at least
    follows the radar. No library has this, so it is defined here, differentiable, and used unchanged as Stage 3's
    training loss, in Stage 3's checkpoint selection and in the promotion gate.

    Definition, per tile:

    1. SAR intensity ``s`` = mean of VV and VH in dB; optical luminance ``o`` = mean reflectance of B02, B03, B04
       and B08, for the prediction (``o_p``) and the real tile (``o_t``).
    2. All three are smoothed with the same 5×5 box (mean) filter, reflect-padded: for the SAR this suppresses
       speckle, which would otherwise dominate its gradients; the same filter on the optical images compares all
       three at one spatial scale.
    3. Sobel gradient magnitudes ``g_s``, ``g_p``, ``g_t`` (``sqrt(gx² + gy² + 1e-8)``), a 2-px border dropped
       (there the filters see padding).
    4. Agreement = ``Σ g_s·|g_p − g_t| / Σ g_s·(g_p + g_t)`` ∈ ``[0, 1]``: the optical edge error, weighted by where
       (and how strongly) the radar sees edges, relative to the edge energy there.

    Why this and not a correlation of optical with SAR edges (GAC's first definition, ``(1 − r)/2``): real optical
    images correlate only loosely with their SAR (the sample's real S2 scored 0.32–0.49 against its own SAR, the
    ridge baseline — a function of the SAR — a *better* 0.25), so that score rewarded optical images that look like
    radar, and no model, however good, could meet the ≤ 0.15 target. Weighting by the SAR keeps the physical intent —
    only structure the radar confirms is scored — while the reference for "right" is the real optical edge.
    A flat prediction scores ≈ 1, doubled edges 1/3, edges at the wrong place up to 1; the score does not depend on
    the dB or reflectance scale of the SAR weights. Magnitudes, not signed gradients, are compared because the sign
    of a boundary's contrast is unrelated between the two sensors.

    Args:
        optical_refl: predicted reflectance ``(B, 12, H, W)`` in :data:`gac.sensors.S2_BANDS` order (see
            :func:`to_reflectance`); may require grad.
        target_refl: the real tile's reflectance, same shape.
        s1_db: backscatter ``(B, 2, H, W)`` in dB (VV, VH).
        reduction: ``"none"`` for one value per tile ``(B,)``, ``"mean"`` for their mean (a scalar).

    Returns:
        ``(B,)`` per-tile agreement, or its mean.
    """
    if optical_refl.ndim != 4 or optical_refl.shape[1] != len(S2_BANDS):
        raise GacError(f"sar_edge: expected (B, {len(S2_BANDS)}, H, W) reflectance, got {tuple(optical_refl.shape)}")
    # float32 whatever comes in (e.g. bf16 under autocast): sums of near-equal numbers need the precision.
    optical_refl = optical_refl.float()
    target_refl = torch.as_tensor(target_refl).to(device=optical_refl.device, dtype=torch.float32)
    _check_pair(optical_refl, target_refl)
    s1_db = torch.as_tensor(s1_db).to(device=optical_refl.device, dtype=torch.float32)
    _check_s1(s1_db, optical_refl)
    min_side = 2 * SAR_EDGE_BORDER + SAR_EDGE_BOX
    if min(optical_refl.shape[2:]) < min_side:
        raise GacError(f"sar_edge: tiles must be at least {min_side} px on each side, got {tuple(optical_refl.shape)}")
    if reduction not in ("none", "mean"):
        raise GacError(f"sar_edge: reduction must be 'none' or 'mean', got {reduction!r}")

    g_sar = edge_magnitude(s1_db.mean(dim=1, keepdim=True)).flatten(1)
    g_pred = edge_magnitude(luminance(optical_refl)).flatten(1)
    g_true = edge_magnitude(luminance(target_refl)).flatten(1)
    g_sar = g_sar / g_sar.mean(dim=1, keepdim=True)  # scale-free weights (dB slopes vary with the scene)
    error = (g_sar * (g_pred - g_true).abs()).sum(dim=1)
    energy = (g_sar * (g_pred + g_true)).sum(dim=1)
    value = (error / (energy + _EPS)).clamp(0.0, 1.0)
    return value.mean() if reduction == "mean" else value


def luminance(refl: Tensor) -> Tensor:
    """Mean reflectance of B02, B03, B04 and B08, ``(B, 1, H, W)``: the optical image whose edges are scored."""
    return refl[:, list(_LUMINANCE_BANDS)].mean(dim=1, keepdim=True)


def edge_magnitude(x: Tensor) -> Tensor:
    """Sobel magnitude of the 5×5 box-smoothed ``x`` ``(B, 1, H, W)``, border of :data:`SAR_EDGE_BORDER` dropped."""
    b = SAR_EDGE_BORDER
    return _sobel_magnitude(_box_filter(x, SAR_EDGE_BOX))[..., b:-b, b:-b]


# ---------------------------------------------------------------------------------------------- token blocks

#: Token size of TerraMind and Prithvi (px): a decoder that paints each token's pixels alone repeats with it.
BLOCK_PX = 16


def block_periodicity(image: Tensor, block: int = BLOCK_PX) -> Tensor:
    """How much ``image`` repeats with the token grid: ``corr(shift = block) − corr(shift = block / 2)``, per tile.

    A pixel decoder that maps each 16×16 token to its own pixels (no overlap across token borders) draws a pattern
    of blocks: its output correlates with itself shifted by one token (16 px) almost perfectly, and much less at half
    a token. Natural images (and residuals of a decoder without blocks) decorrelate with distance, so the score is
    below 0 (the sample's real S2 tiles: about −0.28); a block pattern scores close to +1.

    Per tile: the Pearson correlation of each band with itself shifted by ``block`` px (along rows, and along
    columns), minus the same at ``block // 2`` px, averaged over bands and both axes. A constant band counts as
    correlation 0. Apply it to what a stage *adds* (``opt_v2 − opt_v1``) to see whether its decoder paints blocks.

    Args:
        image: ``(B, C, H, W)``, any units; H and W larger than ``block``.
        block: the token size in pixels.

    Returns:
        ``(B,)`` float32.
    """
    if image.ndim != 4 or min(image.shape[-2:]) <= block:
        raise GacError(f"block_periodicity: expected (B, C, H, W) with H, W > {block}, got {tuple(image.shape)}")
    x = image.float()

    def corr(shift: int, dim: int) -> Tensor:
        a, b = x.narrow(dim, 0, x.shape[dim] - shift), x.narrow(dim, shift, x.shape[dim] - shift)
        a = a - a.mean(dim=(-2, -1), keepdim=True)
        b = b - b.mean(dim=(-2, -1), keepdim=True)
        cov = (a * b).mean(dim=(-2, -1))
        std = (a.pow(2).mean(dim=(-2, -1)) * b.pow(2).mean(dim=(-2, -1))).sqrt()
        return torch.where(std > _EPS, cov / std.clamp_min(_EPS), torch.zeros_like(cov))  # (B, C)

    diff = [corr(block, d) - corr(block // 2, d) for d in (-2, -1)]
    return torch.stack(diff).mean(dim=(0, 2))


# ------------------------------------------------------------------------------------------------------ LPIPS


class LpipsMetric:
    """LPIPS on the RGB bands of 12-band S2 DN tensors (lower is better, 0 = identical); see :func:`lpips_metric`.

    LPIPS is defined on 3-channel images in ``[-1, 1]``: the true-colour bands B04, B03, B02 are taken in that order
    and reflectance ``[0, 1]`` (:func:`to_reflectance`) is mapped linearly to ``[-1, 1]``, keeping the module's one
    data-range convention (no per-tile stretch, so values are comparable across tiles).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        """Wrap a loaded ``lpips.LPIPS`` network, frozen and in eval mode."""
        self.model = model.eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> LpipsMetric:
        """Move the network to ``device`` (inputs are moved to the network's device on call)."""
        self.model.to(device)
        return self

    def __call__(self, pred_dn: Tensor, target_dn: Tensor) -> Tensor:
        """LPIPS per tile.

        Args:
            pred_dn: predicted DN ``(B, 12, H, W)``.
            target_dn: reference DN, same shape.

        Returns:
            ``(B,)`` LPIPS distances.
        """
        pred, target = to_reflectance(pred_dn), to_reflectance(target_dn)
        _check_pair(pred, target)
        device = next(self.model.parameters()).device
        rgb_p = pred[:, list(_RGB)].to(device) * 2.0 - 1.0
        rgb_t = target[:, list(_RGB)].to(device) * 2.0 - 1.0
        return self.model(rgb_p, rgb_t).flatten()


def _torchvision_weight_file(net: str) -> str:
    """File name torchvision caches the ImageNet backbone of ``net`` under (in ``<torch hub>/checkpoints``)."""
    from torchvision import models

    weights = {
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net]
    return Path(weights.url).name


def _load_state(path: Path, what: str) -> dict[str, Tensor]:
    """``torch.load`` a state dict onto the CPU, turning every failure into one GacError line."""
    if not path.is_file():
        raise GacError(f"lpips: {what} file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is bad input
        raise GacError(f"lpips: cannot read {what} file {path}: {exc}".replace("\n", " ")) from exc
    if not isinstance(state, dict):
        raise GacError(f"lpips: {what} file {path} does not hold a state dict")
    return state


def _canonical_lpips_key(key: str) -> str:
    """``lins.<i>.<rest>`` → ``lin<i>.<rest>``: lpips registers each linear layer under both names."""
    if key.startswith("lins."):
        _, idx, rest = key.split(".", 2)
        return f"lin{idx}.{rest}"
    return key


def lpips_metric(
    weights_path: str | Path | None = None,
    backbone_path: str | Path | None = None,
    net: Literal["alex", "vgg", "squeeze"] = "alex",
) -> LpipsMetric:
    """Build an LPIPS metric from local weight files only (nothing is downloaded).

    LPIPS = an ImageNet backbone (torchvision AlexNet/VGG16/SqueezeNet) plus linear layers calibrated on human
    judgements. The ``lpips`` package ships the linear layers but fetches the backbone from the internet, which is not
    available here, so the network is built with a random backbone (``pnet_rand=True``) and every weight is then
    loaded from files:

    * ``weights_path``: a state dict of a whole ``lpips.LPIPS`` module (``torch.save(model.state_dict(), path)`` of a
      pretrained one); it may also hold only the linear layers (``lin0…``), the backbone then comes from
      ``backbone_path``.
    * ``backbone_path``: torchvision's ImageNet state dict of the backbone (e.g. ``alexnet-owt-7be5be79.pth``); its
      ``features.*`` weights are mapped onto the LPIPS trunk. Without ``weights_path`` the linear layers are the ones
      packaged with ``lpips`` (``lpips/weights/v0.1/<net>.pth``).
    * neither: the torchvision file is looked for in the torch hub cache (``$TORCH_HOME/hub/checkpoints``).

    A partial load would give a plausible-looking but meaningless number, so every trunk and linear weight must be
    covered, else :class:`GacError` names what is missing.

    Args:
        weights_path: full (or linear-layers-only) ``lpips.LPIPS`` state dict file.
        backbone_path: torchvision backbone state dict file.
        net: the LPIPS trunk, ``"alex"`` (the usual choice for a metric), ``"vgg"`` or ``"squeeze"``.

    Returns:
        A callable ``(pred_dn, target_dn) -> (B,)``.

    Raises:
        GacError: weights missing, unreadable or not matching ``net``.
    """
    if net not in ("alex", "vgg", "squeeze"):
        raise GacError(f"lpips: net must be 'alex', 'vgg' or 'squeeze', got {net!r}")
    if weights_path is None and backbone_path is None:
        cached = Path(torch.hub.get_dir(), "checkpoints", _torchvision_weight_file(net))
        if not cached.is_file():
            raise GacError(
                f"lpips: no pretrained {net} weights available offline: pass weights_path (a saved lpips.LPIPS "
                f"state dict) or backbone_path (torchvision {cached.name}), or put {cached.name} at {cached}"
            )
        backbone_path = cached

    import lpips  # lazy: pulls in torchvision

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" noise from lpips' own code
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)

    state: dict[str, Tensor] = {}
    if backbone_path is not None:
        tv_state = _load_state(Path(backbone_path), "backbone")
        # lpips keeps torchvision's layer indices inside its slices: features.<i>.* -> net.slice<k>.<i>.*
        where = {idx: name for name, sl in model.net.named_children() for idx in sl._modules}
        for key, value in tv_state.items():
            parts = key.split(".")
            if parts[0] == "features" and parts[1] in where:
                state[".".join(["net", where[parts[1]], *parts[1:]])] = value
        if weights_path is None:
            packaged = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
            state.update(_load_state(packaged, "packaged linear-layer"))
    if weights_path is not None:
        state.update(_load_state(Path(weights_path), "weights"))
    # lpips registers each linear layer twice (lin0 and lins.0); accept either spelling.
    state = {_canonical_lpips_key(k): v for k, v in state.items()}

    required = [k for k in model.state_dict() if k.startswith(("net.", "lin")) and not k.startswith("lins.")]
    missing = [k for k in required if k not in state]
    if missing:
        part = "backbone (net.*)" if any(k.startswith("net.") for k in missing) else "linear layers (lin*)"
        sources = ", ".join(str(p) for p in (weights_path, backbone_path) if p is not None)
        raise GacError(f"lpips: {net} {part} weights missing from {sources} (e.g. {missing[0]})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise GacError(f"lpips: weights do not fit the {net} network: {str(exc).splitlines()[0]}") from exc
    unexpected = [k for k in state if k not in model.state_dict()]
    if unexpected:
        raise GacError(f"lpips: weights hold keys the {net} network does not have (e.g. {unexpected[0]})")
    return LpipsMetric(model)


# ----------------------------------------------------------------------------------------------- aggregation


def per_tile(
    pred_dn: Tensor,
    target_dn: Tensor,
    s1_db: Tensor,
    lpips_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Every metric, one value per tile, for aggregating over a whole test split.

    The split value of a metric is the plain mean of its per-tile values over all tiles (concatenate these across
    batches, then average): PSNR in particular is averaged per tile, not computed from the pooled MSE, and RMSE is
    the mean of tile RMSEs. Computed without autograd.

    Args:
        pred_dn: predicted DN ``(B, 12, H, W)``.
        target_dn: reference DN ``(B, 12, H, W)``.
        s1_db: the SAR input ``(B, 2, H, W)`` in dB, for ``sar_edge`` (its edges weight the optical edge error).
        lpips_fn: optional :func:`lpips_metric` result; adds ``lpips``.

    Returns:
        ``{name: (B,) float tensor on the CPU}`` with the keys of the module table.
    """
    pred, target = to_reflectance(pred_dn), to_reflectance(target_dn)
    _check_pair(pred, target)
    s1 = torch.as_tensor(s1_db).to(device=pred.device, dtype=torch.float32)
    _check_s1(s1, pred)
    with torch.no_grad():
        out = {
            "psnr": psnr(pred, target),
            "ssim": ssim(pred, target),
            "ms_ssim": ms_ssim(pred, target),
            "sam_deg": sam_deg(pred, target),
            "mae": mae(pred, target),
            "rmse": rmse(pred, target),
            "ndvi_err": ndvi_err(pred, target),
            "sar_edge": sar_edge_agreement(pred, target, s1),
        }
        if lpips_fn is not None:
            out["lpips"] = lpips_fn(pred_dn, target_dn)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def compute_all(
    pred_dn: Tensor,
    target_dn: Tensor,
    s1_db: Tensor,
    lpips_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Batch means of every metric of :func:`per_tile` (``lpips`` only when ``lpips_fn`` is given).

    Args:
        pred_dn: predicted DN ``(B, 12, H, W)``.
        target_dn: reference DN ``(B, 12, H, W)``.
        s1_db: the SAR input ``(B, 2, H, W)`` in dB.
        lpips_fn: optional :func:`lpips_metric` result.

    Returns:
        ``{name: float}``; see the module table for which direction is better.
    """
    return {k: float(v.mean()) for k, v in per_tile(pred_dn, target_dn, s1_db, lpips_fn).items()}
