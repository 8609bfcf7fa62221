"""gac.evaluation.metrics against independent references: scikit-image, torchmetrics' class API and plain numpy
formulas.

The arrays are "random but structured" (a smooth field plus noise) so that SSIM and SAM sit in their informative
middle range, where a wrong window, constant or crop would show, rather than at 0 or 1.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from gac.errors import GacError
from gac.evaluation import metrics

#: float comparisons of kernel output: `make test` runs them again with oneDNN and MKL held to AVX2
pytestmark = pytest.mark.numerics

B, C, N = 2, 12, 120
TOL = 1e-4


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Reference and prediction reflectance (B, 12, 120, 120) in [0, 1]: smooth fields, noise and a band-wise bias."""
    rng = np.random.default_rng(42)
    field = gaussian_filter(rng.standard_normal((B, C, N, N)), sigma=(0, 0, 4, 4))
    field = (field - field.min()) / (field.max() - field.min())
    target = 0.05 + 0.4 * field
    bias = rng.normal(0, 0.02, (1, C, 1, 1))
    pred = np.clip(target + bias + rng.normal(0, 0.03, target.shape), 0, 1)
    return torch.from_numpy(pred.astype(np.float32)), torch.from_numpy(target.astype(np.float32))


@pytest.fixture(scope="module")
def lpips_net() -> torch.nn.Module:
    """A randomly initialised LPIPS AlexNet, standing in for pretrained weights that cannot be downloaded here."""
    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated", from lpips' code
        return lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False).eval()


# ------------------------------------------------------------------------------------------------ conventions


def test_to_reflectance_divides_by_10000_and_clips() -> None:
    dn = torch.tensor([0, 2500, 10000, 15000], dtype=torch.int32)
    out = metrics.to_reflectance(dn)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, 0.25, 1.0, 1.0]
    assert metrics.to_reflectance(torch.tensor([-5.0])).item() == 0.0


def test_sar_to_unit_uses_fixed_windows() -> None:
    s1 = torch.tensor([-25.0, 0.0, -32.5, -16.25]).view(1, 2, 1, 2)
    assert metrics.sar_to_unit(s1).flatten().tolist() == [0.0, 1.0, 0.0, 0.5]


# ------------------------------------------------------------------------------------------------ PSNR / SSIM


def test_psnr_matches_skimage_and_torchmetrics(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    from torchmetrics.image import PeakSignalNoiseRatio

    pred, target = pair
    ours = metrics.psnr(pred, target)
    assert ours.shape == (B,)
    for i in range(B):
        ref = sk_psnr(target[i].double().numpy(), pred[i].double().numpy(), data_range=1.0)
        assert ours[i].item() == pytest.approx(ref, abs=TOL)
        tm = PeakSignalNoiseRatio(data_range=1.0)
        tm.update(pred[i : i + 1], target[i : i + 1])
        assert ours[i].item() == pytest.approx(tm.compute().item(), abs=TOL)
    # The split value is the mean of per-tile PSNRs, which is torchmetrics' dim=(1, 2, 3) mode, not its pooled MSE.
    per_image = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
    per_image.update(pred, target)
    assert ours.mean().item() == pytest.approx(per_image.compute().item(), abs=TOL)


def test_psnr_of_identical_tiles_is_capped_not_inf(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, target = pair
    assert metrics.psnr(target, target).tolist() == [metrics.PSNR_MAX_DB] * B


def test_ssim_matches_skimage_and_torchmetrics(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    pred, target = pair
    ours = metrics.ssim(pred, target)
    assert ours.shape == (B,)
    assert 0.3 < ours.min().item() < ours.max().item() < 0.99  # informative range, not a degenerate 0 or 1
    # scikit-image filters with scipy's mode="reflect" (edge sample repeated) and then drops a border of the window
    # radius, (11 - 1) // 2 = 5 px, before averaging; torchmetrics reflect-pads without repeating the edge sample and
    # averages the whole map. Inside the 5-px border the window never reaches the padding, so both agree there, and
    # that interior mean is what gac.evaluation.metrics.ssim reports.
    for i in range(B):
        ref = sk_ssim(
            target[i].double().numpy(),
            pred[i].double().numpy(),
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert ours[i].item() == pytest.approx(ref, abs=TOL)
    tm = StructuralSimilarityIndexMeasure(data_range=1.0, sigma=1.5, k1=0.01, k2=0.03, return_full_image=True)
    tm_value, tm_map = tm(pred, target)
    torch.testing.assert_close(metrics.ssim_map(pred, target), tm_map, atol=TOL, rtol=0)
    assert ours.mean().item() == pytest.approx(tm_map[..., 5:-5, 5:-5].mean().item(), abs=TOL)
    # torchmetrics' own scalar is the uncropped mean: the two conventions really differ, so the crop is not a no-op.
    assert tm_value.item() == pytest.approx(tm_map.mean().item(), abs=TOL)
    assert abs(tm_value.item() - ours.mean().item()) > 10 * TOL


def test_ms_ssim_works_at_120_px(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    pred, target = pair
    same = metrics.ms_ssim(target, target)
    assert same.shape == (B,)
    torch.testing.assert_close(same, torch.ones(B), atol=1e-5, rtol=0)
    ours = metrics.ms_ssim(pred, target)
    assert (ours > 0).all() and (ours < 1).all()
    assert sum(metrics.MS_SSIM_BETAS) == pytest.approx(1.0)
    tm = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0, betas=metrics.MS_SSIM_BETAS)
    assert ours.mean().item() == pytest.approx(tm(pred, target).item(), abs=TOL)


# ------------------------------------------------------------------------------------------------------ SAM


def test_sam_matches_numpy_and_torchmetrics(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    from torchmetrics.image import SpectralAngleMapper

    pred, target = pair
    ours = metrics.sam_deg(pred, target)
    p, t = pred.double().numpy(), target.double().numpy()
    cos = (p * t).sum(axis=1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1))
    ref = np.degrees(np.arccos(np.clip(cos, -1, 1))).mean(axis=(1, 2))
    np.testing.assert_allclose(ours.numpy(), ref, atol=TOL, rtol=0)
    assert ref.min() > 1.0  # a real angle, not a vacuous 0 == 0
    tm = SpectralAngleMapper()
    assert ours.mean().item() == pytest.approx(np.degrees(tm(pred, target).item()), abs=TOL)


def test_sam_zero_spectra_convention() -> None:
    target = torch.full((1, 12, 2, 2), 0.2)
    pred = target.clone()
    pred[0, :, 0, 0] = 0.0  # one black predicted pixel: 90°, three exact pixels: 0°
    assert metrics.sam_deg(pred, target).item() == pytest.approx(90.0 / 4, abs=TOL)
    assert metrics.sam_deg(torch.zeros_like(target), torch.zeros_like(target)).item() == 0.0


# ----------------------------------------------------------------------------------------------- MAE / NDVI


def test_mae_rmse_ndvi(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    pred, target = pair
    diff = (pred - target).double().numpy()
    np.testing.assert_allclose(metrics.mae(pred, target).numpy(), np.abs(diff).mean(axis=(1, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(metrics.rmse(pred, target).numpy(), np.sqrt((diff**2).mean(axis=(1, 2, 3))), atol=1e-6)
    red, nir = 3, 7  # B04, B08 in S2_BANDS order
    p, t = pred.double().numpy(), target.double().numpy()
    ndvi_p = (p[:, nir] - p[:, red]) / (p[:, nir] + p[:, red] + 1e-6)
    ndvi_t = (t[:, nir] - t[:, red]) / (t[:, nir] + t[:, red] + 1e-6)
    np.testing.assert_allclose(
        metrics.ndvi_err(pred, target).numpy(), np.abs(ndvi_p - ndvi_t).mean(axis=(1, 2)), atol=1e-5
    )


# ------------------------------------------------------------------------------------------ SAR-edge agreement


def _blobs(rng: np.random.Generator) -> np.ndarray:
    """A two-class map of smooth blobs (a thresholded smooth field), like fields against forest."""
    return (gaussian_filter(rng.standard_normal((N, N)), 6.0) > 0).astype(np.float64)


def _sar(classes: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """VV, VH in dB from a class map, with 4-look gamma speckle: (1, 2, N, N)."""
    sigma0 = np.where(classes > 0, 0.15, 0.02) * rng.gamma(4.0, 0.25, size=(2, *classes.shape))
    return torch.from_numpy(10 * np.log10(sigma0)).float()[None]


def _optical(classes: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """12-band reflectance from a class map, with a little sensor noise: (1, 12, N, N)."""
    refl = np.where(classes > 0, 0.35, 0.08)[None].repeat(12, 0) + rng.normal(0, 0.005, (12, *classes.shape))
    return torch.from_numpy(np.clip(refl, 0, 1)).float()[None]


def test_sar_edge_agreement_behaviour() -> None:
    """0 for the real image (a perfect model meets any target), ≈ 1 flat, worse for edges the truth lacks."""
    rng = np.random.default_rng(0)
    classes, other = _blobs(rng), _blobs(rng)
    s1, truth = _sar(classes, rng), _optical(classes, rng)

    perfect = metrics.sar_edge_agreement(truth, truth, s1)
    resampled = metrics.sar_edge_agreement(_optical(classes, rng), truth, s1)  # same scene, other sensor noise
    inverted = metrics.sar_edge_agreement(_optical(1 - classes, rng), truth, s1)  # edges, not their polarity, count
    elsewhere = metrics.sar_edge_agreement(_optical(other, rng), truth, s1)
    flat = metrics.sar_edge_agreement(torch.full((1, 12, N, N), 0.2), truth, s1)
    halved = metrics.sar_edge_agreement(0.2 + 0.5 * (truth - 0.2), truth, s1)  # edges at half contrast
    assert perfect.shape == (1,) and perfect.item() == 0.0
    assert resampled.item() < 0.1 and inverted.item() < 0.1
    assert flat.item() > 0.95
    assert elsewhere.item() > 0.5
    assert halved.item() == pytest.approx(1 / 3, abs=0.05)  # |g − g/2| / (g + g/2)
    assert perfect < resampled < halved < elsewhere < flat

    batch = metrics.sar_edge_agreement(torch.rand(3, 12, N, N), torch.rand(3, 12, N, N), torch.randn(3, 2, N, N) - 12)
    assert batch.shape == (3,)
    assert ((batch >= 0) & (batch <= 1)).all()


def test_sar_edge_agreement_scores_only_where_the_sar_sees_edges() -> None:
    """An optical error where the radar is flat costs nothing; the same error on the radar's edges does."""
    rng = np.random.default_rng(3)
    stripes = np.tile(((np.arange(N) // 10) % 2).astype(np.float64), (N, 1))
    left = stripes.copy()
    left[:, N // 2 :] = 0  # the SAR sees stripes only in the left half
    s1, truth = _sar(left, rng), _optical(stripes, rng)  # the real optical image has stripes everywhere
    blur_left, blur_right = truth.clone(), truth.clone()
    blur_left[..., : N // 2] = truth[..., : N // 2].mean()
    blur_right[..., N // 2 :] = truth[..., N // 2 :].mean()
    on_sar_edges = metrics.sar_edge_agreement(blur_left, truth, s1).item()
    off_sar_edges = metrics.sar_edge_agreement(blur_right, truth, s1).item()
    assert on_sar_edges > 3 * off_sar_edges, (on_sar_edges, off_sar_edges)


def test_sar_edge_agreement_is_scale_free_in_the_sar() -> None:
    rng = np.random.default_rng(1)
    classes = _blobs(rng)
    s1, opt, truth = _sar(classes, rng), _optical(_blobs(rng), rng), _optical(classes, rng)
    base = metrics.sar_edge_agreement(opt, truth, s1)
    torch.testing.assert_close(metrics.sar_edge_agreement(opt, truth, s1 * 3 - 7), base, atol=1e-4, rtol=0)
    # and in the optical scale when prediction and truth scale together
    torch.testing.assert_close(metrics.sar_edge_agreement(opt * 0.5, truth * 0.5, s1), base, atol=1e-3, rtol=0)


def test_sar_edge_agreement_gradients_are_finite() -> None:
    rng = np.random.default_rng(2)
    classes = _blobs(rng)
    s1, truth = _sar(classes, rng), _optical(classes, rng)
    for start in (torch.rand(1, 12, N, N), torch.full((1, 12, N, N), 0.2)):  # textured, and flat (sqrt at 0)
        opt = start.clone().requires_grad_(True)
        loss = metrics.sar_edge_agreement(opt, truth, s1, reduction="mean")
        loss.backward()
        assert loss.ndim == 0
        assert torch.isfinite(opt.grad).all()
    # Gradient steps along -grad must lower the loss of a textured start: the gradient points somewhere useful.
    opt = torch.rand(1, 12, N, N, requires_grad=True)
    loss = metrics.sar_edge_agreement(opt, truth, s1, reduction="mean")
    loss.backward()
    assert opt.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = metrics.sar_edge_agreement(opt - 0.05 * opt.grad / opt.grad.abs().max(), truth, s1, "mean")
    assert stepped.item() < loss.item()


def test_sar_edge_agreement_rejects_bad_shapes() -> None:
    with pytest.raises(GacError, match="Sentinel-1"):
        metrics.sar_edge_agreement(torch.rand(1, 12, N, N), torch.rand(1, 12, N, N), torch.rand(1, 3, N, N))
    with pytest.raises(GacError, match="reflectance"):
        metrics.sar_edge_agreement(torch.rand(1, 4, N, N), torch.rand(1, 4, N, N), torch.rand(1, 2, N, N))
    with pytest.raises(GacError, match="differs from target"):
        metrics.sar_edge_agreement(torch.rand(1, 12, N, N), torch.rand(2, 12, N, N), torch.rand(1, 2, N, N))


# ----------------------------------------------------------------------------------------- block periodicity


def test_block_periodicity_tells_token_blocks_from_images() -> None:
    rng = np.random.default_rng(4)
    g = torch.Generator().manual_seed(0)
    # what a per-token linear head adds: one random 16×16 pattern repeated on the token grid, per band
    pattern = torch.randn(2, 12, 16, 16, generator=g)
    blocks = pattern.repeat(1, 1, 8, 8)[..., :N, :N]
    smooth = torch.from_numpy(np.stack([gaussian_filter(rng.standard_normal((12, N, N)), (0, 3, 3)) for _ in range(2)]))
    scene = _optical(_blobs(rng), rng)
    assert (metrics.block_periodicity(blocks) > 0.9).all()
    assert (metrics.block_periodicity(smooth) < 0).all()
    assert (metrics.block_periodicity(scene) < 0.05).all()
    # smooth upsampling of a token grid (what TokenPixelDecoder does) does not repeat with the grid
    tokens = torch.randn(2, 12, 8, 8, generator=g)
    upsampled = torch.nn.functional.interpolate(tokens, size=(N, N), mode="bilinear", align_corners=False)
    assert (metrics.block_periodicity(upsampled) < 0.05).all()
    assert metrics.block_periodicity(torch.zeros(1, 12, N, N)).item() == 0.0  # nothing added: no blocks
    with pytest.raises(GacError, match="block_periodicity"):
        metrics.block_periodicity(torch.zeros(1, 12, 16, 16))


# ------------------------------------------------------------------------------------------------------ LPIPS


def test_lpips_without_weights_raises_one_clear_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache, whatever this machine has
    with pytest.raises(GacError, match="no pretrained alex weights") as info:
        metrics.lpips_metric()
    message = str(info.value)
    assert "\n" not in message
    assert "weights_path" in message and "alexnet-owt-7be5be79.pth" in message
    with pytest.raises(GacError, match="not found"):
        metrics.lpips_metric(weights_path=tmp_path / "missing.pth")


def test_lpips_loads_local_weights(tmp_path, pair: tuple[torch.Tensor, torch.Tensor], lpips_net) -> None:
    path = tmp_path / "lpips_alex.pth"
    torch.save(lpips_net.state_dict(), path)

    fn = metrics.lpips_metric(weights_path=path)
    pred, target = pair
    pred_dn, target_dn = pred * 10000, target * 10000
    assert fn(target_dn, target_dn).tolist() == [0.0] * B
    value = fn(pred_dn, target_dn)
    assert value.shape == (B,) and (value > 0).all()
    # Same numbers as the network it was saved from, on RGB = (B04, B03, B02) scaled to [-1, 1].
    with torch.no_grad():
        direct = lpips_net(pred[:, [3, 2, 1]] * 2 - 1, target[:, [3, 2, 1]] * 2 - 1).flatten()
    torch.testing.assert_close(value, direct)


def test_lpips_backbone_file_and_partial_weights(tmp_path, lpips_net) -> None:
    import lpips

    # A torchvision-style backbone file: features.<i>.* (only the features are needed, keeping the file small).
    features = {
        f"features.{key.split('.', 2)[2]}": value
        for key, value in lpips_net.state_dict().items()
        if key.startswith("net.slice")
    }
    backbone = tmp_path / "alexnet-owt.pth"
    torch.save(features, backbone)
    fn = metrics.lpips_metric(backbone_path=backbone)
    torch.testing.assert_close(fn.model.net.slice1[0].weight, lpips_net.net.slice1[0].weight)
    torch.testing.assert_close(fn.model.net.slice5._modules["10"].weight, lpips_net.net.slice5._modules["10"].weight)
    packaged = torch.load(
        f"{lpips.__path__[0]}/weights/v0.1/alex.pth", map_location="cpu", weights_only=True
    )  # the calibrated linear layers that ship with the package
    torch.testing.assert_close(fn.model.lin0.model[1].weight, packaged["lin0.model.1.weight"])

    linear_only = tmp_path / "lin.pth"
    torch.save({k: v for k, v in lpips_net.state_dict().items() if k.startswith("lin")}, linear_only)
    with pytest.raises(GacError, match=r"backbone \(net\.\*\) weights missing"):
        metrics.lpips_metric(weights_path=linear_only)


# -------------------------------------------------------------------------------------------------- aggregation


def test_per_tile_and_compute_all(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    pred, target = pair
    pred_dn = (pred * 10000).round().to(torch.int32)
    target_dn = (target * 10000).round().to(torch.int32)
    s1 = torch.randn(B, 2, N, N) * 3 - 12
    calls = []

    def fake_lpips(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # wiring only; LPIPS itself is tested above
        calls.append((p, t))
        return torch.arange(p.shape[0], dtype=torch.float32)

    tiles = metrics.per_tile(pred_dn, target_dn, s1, lpips_fn=fake_lpips)
    assert set(tiles) == {"psnr", "ssim", "ms_ssim", "sam_deg", "mae", "rmse", "ndvi_err", "sar_edge", "lpips"}
    assert all(v.shape == (B,) and torch.isfinite(v).all() for v in tiles.values())
    assert calls[0][0] is pred_dn and calls[0][1] is target_dn  # LPIPS gets DN like every entry point
    torch.testing.assert_close(tiles["psnr"], metrics.psnr(pred_dn / 10000, target_dn / 10000))
    torch.testing.assert_close(
        tiles["sar_edge"], metrics.sar_edge_agreement(pred_dn / 10000, (target_dn / 10000).clamp(0, 1), s1)
    )

    perfect = metrics.compute_all(target_dn[:1], target_dn[:1], s1[:1])
    assert "lpips" not in perfect
    assert all(isinstance(v, float) for v in perfect.values())
    assert perfect["psnr"] == metrics.PSNR_MAX_DB
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["ms_ssim"] == pytest.approx(1.0)
    assert perfect["mae"] == perfect["rmse"] == perfect["ndvi_err"] == 0.0
    assert perfect["sam_deg"] == pytest.approx(0.0, abs=1e-4)


def test_mismatched_inputs_raise_gac_error(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    pred, target = pair
    s1 = torch.zeros(B, 2, N, N)
    with pytest.raises(GacError, match="differs"):
        metrics.per_tile(pred[:, :, :60], target, s1)
    with pytest.raises(GacError, match="Sentinel-2"):
        metrics.per_tile(pred[:, :3], target[:, :3], s1)
    with pytest.raises(GacError, match="does not match"):
        metrics.per_tile(pred, target, s1[:, :, :60])
