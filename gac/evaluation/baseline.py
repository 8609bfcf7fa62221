"""The classical baseline of the ablation: per-pixel ridge regression from Sentinel-1 alone to the 12 S2 bands.

Why it exists: a number such as "PSNR 14 dB" means little on its own. The baseline answers "how much of it does a
linear model of the local backscatter already get?", so the deep stages have to beat something that costs seconds to
fit and nothing to run. It sees only the SAR of one tile, like Stage 1.

Model, per pixel (10 features, plus an intercept):

* ``VV``, ``VH``, ``VV − VH`` (dB) — backscatter and the cross-polarisation ratio, which separates vegetation, bare
  soil, water and built-up surfaces;
* the 5×5 box means of ``VV`` and ``VH`` (reflect-padded) — speckle-suppressed backscatter, the same window the
  SAR-edge metric uses (:data:`gac.evaluation.metrics.SAR_EDGE_BOX`);
* the squares of those five — a cheap quadratic term (water is dark in both polarisations, forest bright in VH).

Targets are the 12 L2A bands in DN. Features are standardised with the training mean and standard deviation and the
weights solved in closed form, ``w = (Σ_zz + λ I)⁻¹ Σ_zy`` on the standardised covariances, intercept = mean target.
:func:`fit_baseline` streams the training tiles once and accumulates the augmented Gram matrix ``[1, x]ᵀ [1, x | y]``
in float64, so memory does not grow with the number of tiles; mean, covariance and the solution all follow from it.
Deterministic: same tiles → same weights, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gac.errors import GacError
from gac.io.store import ShardStore

#: Names of the per-pixel features, in column order.
FEATURES: tuple[str, ...] = (
    "VV", "VH", "VV-VH", "box5(VV)", "box5(VH)",
    "VV^2", "VH^2", "(VV-VH)^2", "box5(VV)^2", "box5(VH)^2",
)  # fmt: skip
#: Side of the box filter (px).
BOX = 5
#: Largest L2A DN a prediction is clipped to.
DN_MAX = 65535


def box_mean(x: np.ndarray, size: int = BOX) -> np.ndarray:
    """Mean over a ``size``×``size`` window of the last two axes, reflect-padded, same shape out (float64)."""
    pad = size // 2
    width = [(0, 0)] * (x.ndim - 2) + [(pad, pad), (pad, pad)]
    c = np.pad(x.astype(np.float64), width, mode="reflect").cumsum(-1).cumsum(-2)
    c = np.pad(c, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)])  # a zero row/column so window sums are differences
    h, w = x.shape[-2:]
    total = c[..., size:, size:] - c[..., :h, size:] - c[..., size:, :w] + c[..., :h, :w]
    return total / (size * size)


def features(s1_db: np.ndarray) -> np.ndarray:
    """Per-pixel features of :data:`FEATURES` for S1 ``(B, 2, H, W)`` dB ``[VV, VH]`` → ``(B, 10, H, W)`` float64."""
    s1 = np.asarray(s1_db, dtype=np.float64)
    if s1.ndim != 4 or s1.shape[1] != 2:
        raise GacError(f"baseline: expected S1 dB shaped (B, 2, H, W) [VV, VH], got {s1.shape}")
    vv, vh = s1[:, 0], s1[:, 1]
    box = box_mean(s1)
    linear = np.stack([vv, vh, vv - vh, box[:, 0], box[:, 1]], axis=1)
    return np.concatenate([linear, linear**2], axis=1)


def _pixels(x: np.ndarray) -> np.ndarray:
    """``(B, C, H, W)`` → ``(B·H·W, C)``."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


@dataclass(frozen=True)
class Baseline:
    """A fitted ridge model: standardisation, weights ``(10, 12)`` and intercept ``(12,)`` in DN."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    intercept: np.ndarray
    ridge: float
    tiles: int
    pixels: int

    def predict_float(self, s1_db: np.ndarray) -> np.ndarray:
        """Unclipped DN ``(B, 12, H, W)`` float64 for S1 dB ``(B, 2, H, W)``."""
        f = features(s1_db)
        z = (_pixels(f) - self.mean) / self.std
        y = z @ self.weights + self.intercept
        b, _, h, w = f.shape
        return np.moveaxis(y.reshape(b, h, w, -1), -1, 1)

    def predict(self, s1_db: np.ndarray) -> np.ndarray:
        """S2 L2A DN ``(B, 12, H, W)`` uint16 for S1 dB ``(B, 2, H, W)`` (rounded, clipped to the DN range)."""
        return np.clip(np.rint(self.predict_float(s1_db)), 0, DN_MAX).astype(np.uint16)

    def state(self) -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez`` and MLflow artifacts); :meth:`from_state` inverts it."""
        return {
            "mean": self.mean, "std": self.std, "weights": self.weights, "intercept": self.intercept,
            "ridge": np.float64(self.ridge), "tiles": np.int64(self.tiles), "pixels": np.int64(self.pixels),
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: dict) -> Baseline:
        """Rebuild a model from :meth:`state` (or an ``np.load`` of it)."""
        missing = [k for k in ("mean", "std", "weights", "intercept", "ridge", "tiles", "pixels") if k not in state]
        if missing:
            raise GacError(f"baseline: state lacks {missing} (expected the keys Baseline.state() writes)")
        arr = {k: np.asarray(state[k], dtype=np.float64) for k in ("mean", "std", "weights", "intercept")}
        if arr["weights"].shape != (len(FEATURES), arr["intercept"].shape[0]):
            raise GacError(f"baseline: weights shape {arr['weights'].shape} does not fit {len(FEATURES)} features")
        return cls(**arr, ridge=float(state["ridge"]), tiles=int(state["tiles"]), pixels=int(state["pixels"]))


def select_tiles(index: pd.DataFrame, split: str, max_tiles: int | None) -> pd.DataFrame:
    """Rows of ``split`` sorted by patch id; at most ``max_tiles`` of them, evenly spread (deterministic)."""
    rows = index[index["split"] == split].sort_values("patch_id").reset_index(drop=True)
    if max_tiles is not None and len(rows) > max_tiles:
        rows = rows.iloc[np.linspace(0, len(rows) - 1, max_tiles).round().astype(int)].reset_index(drop=True)
    return rows


def fit_baseline(
    catalog_store: ShardStore,
    split: str = "train",
    ridge: float = 1e-3,
    max_tiles: int | None = None,
    batch_size: int = 16,
) -> Baseline:
    """Fit the ridge baseline on the ``split`` tiles of a catalog (keys ``s1`` dB and ``s2`` DN).

    Args:
        catalog_store: The tile catalog.
        split: Split to fit on (the training split; never the evaluated one).
        ridge: λ on the standardised features (relative to unit variance, so it does not depend on the tile count).
        max_tiles: Fit on at most this many tiles, evenly spread over the sorted split (``None``: all).
        batch_size: Tiles read at a time (memory ≈ 2 MB per tile).

    Returns:
        The fitted :class:`Baseline`.

    Raises:
        GacError: The split has no tiles, or its SAR holds no finite pixel.
    """
    rows = select_tiles(catalog_store.index, split, max_tiles)
    if rows.empty:
        raise GacError(f"{catalog_store.root}: no '{split}' tiles to fit the baseline on (check catalog.splits)")
    n_feat = len(FEATURES)
    gram = None  # [1, x]ᵀ [1, x, y], float64
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start : start + batch_size]
        x = _pixels(features(catalog_store.read("s1", chunk)))
        y = _pixels(catalog_store.read("s2", chunk).astype(np.float64))
        ok = np.isfinite(x).all(axis=1)
        a = np.concatenate([np.ones((int(ok.sum()), 1)), x[ok]], axis=1)
        part = a.T @ np.concatenate([a, y[ok]], axis=1)
        gram = part if gram is None else gram + part
    n = gram[0, 0]
    if n == 0:
        raise GacError(f"{catalog_store.root}: no finite SAR pixel in the '{split}' tiles")
    moments = gram / n
    mean_x, mean_y = moments[0, 1 : 1 + n_feat], moments[0, 1 + n_feat :]
    cov_xx = moments[1 : 1 + n_feat, 1 : 1 + n_feat] - np.outer(mean_x, mean_x)
    cov_xy = moments[1 : 1 + n_feat, 1 + n_feat :] - np.outer(mean_x, mean_y)
    std = np.sqrt(np.clip(np.diag(cov_xx), 0, None))
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature gets weight 0 through the ridge, not a division by 0
    cov_zz = cov_xx / np.outer(std, std)
    cov_zy = cov_xy / std[:, None]
    weights = np.linalg.solve(cov_zz + ridge * np.eye(n_feat), cov_zy)
    return Baseline(mean_x, std, weights, mean_y, ridge=ridge, tiles=len(rows), pixels=int(n))
