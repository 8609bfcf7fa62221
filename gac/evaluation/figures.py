"""The evaluation's figures, made for a remote-sensing reader: every panel says what it shows, in what units.

Three figures per visualised tile (written by :func:`gac.evaluation.ablation.visualise`):

* :func:`comparison_figure` — Sentinel-1 σ⁰ VV and VH, each optical prediction, the real Sentinel-2 L2A tile and the
  error of the last prediction;
* :func:`grounding_figure` — where Stage 3 changed the image (``|opt_v3 − opt_v2|``) against the radar's edges;
* :func:`attention_figure` — how much of Stage 3's cross-attention goes to the SAR tokens.

and, for the MLflow run of a training (:mod:`gac.training.run_media`), :func:`curve_figure` — one metric over the
optimizer steps.

Each ``*_figure`` returns a :class:`matplotlib.figure.Figure` (Agg canvas, never registered with pyplot, so there is
no global state to close and the figures can be built in worker threads); its titles, labels and colourbars can be
inspected without reading pixels. Each ``save_*`` builds one, writes it with :func:`save_figure` and drops it.

Why each choice:

* **Metrics in the titles** (``opt_v2 · PSNR 20.96 dB · SSIM 0.51``, then SAM and the SAR-edge score): a bare number
  under an image is unreadable without the ablation table beside it. The values are the per-tile scores of
  :func:`gac.evaluation.metrics.per_tile` (reflectance, clipped to ``[0, 1]``), so they are those of
  ``plots/per_tile.csv``.
* **True colour B04/B03/B02, one stretch for the row, stated in the figure**: every optical panel gets the same
  linear stretch, the truth's 2–98 % percentiles (one pair for the three bands, so colours keep their balance). A
  prediction that is too bright or too dark then looks it instead of being rescaled into looking right, and a noisy
  prediction cannot flatten the contrast of the whole row. The composite and the stretch (with its reflectance
  limits) are written in the suptitle because a reader cannot otherwise tell a stretch artefact from a model error.
* **VV and VH as separate grey panels with fixed dB windows** (:data:`gac.evaluation.metrics.SAR_DB_RANGE`: VV −25…0 dB,
  VH −32.5…0 dB) and a ``σ⁰ … [dB]`` colourbar each: the two polarisations see different things (VV surfaces and
  moisture, VH volume scattering such as vegetation), and a fixed window means a grey level is the same
  backscatter in every tile, unlike a per-tile min–max stretch.
* **Error and change maps name their bands and unit**: ``|opt_v3 − truth|, mean over 12 bands [reflectance]``
  (reflectance = DN / 10000). The colour scale runs from 0 to the map's 99th percentile (the colourbar is marked
  as extended above it), so a few saturated pixels (clouds, specular targets) cannot wash out the rest of the map.
* **Uncertainty beside the error**: when the last prediction's cache holds ``sigma`` (its calibrated 1 σ per pixel
  and band), the comparison shows ``σ of opt_v3`` (mean over the same bands, reflectance) next to the error map, on
  *one* colour scale with one colourbar (0 to the larger of the two maps' 99th percentiles). Where the model is
  honest about its uncertainty the two maps look alike (for a Gaussian error, mean |error| ≈ 0.8 σ); a region dark
  in σ but bright in error is where it is wrong and sure of itself.
* **Where the weights came from and which split, in every title** (:func:`weights_caption`): a pipeline run from
  random-init weights (the sample's demo) makes flat, beige images that look like a broken pipeline unless the figure
  says, in words, that the models were never trained from released weights.
* **SAR edges as contours, said in the figure**: the contour is the 90th percentile of the Sobel magnitude of the
  5×5-box-smoothed mean of VV and VH in dB (:func:`sar_edges`, the SAR edges
  :func:`gac.evaluation.metrics.sar_edge_agreement`
  weights by), so the grounding map shows whether Stage 3 changed the image where the radar sees boundaries.
* **Attention on its real geometry**: :meth:`gac.models.grounding.Grounder.cross_attention_maps` gives one value
  per 16 px output patch query of the *padded* model input (e.g. 14 × 14 for 224 px), the share of the last
  decoder layer's cross-attention (mean over heads) that falls on the S1 tokens. The map is drawn at that geometry
  (the 120 px tile centred in it, as :mod:`gac.models.geometry` pads) with the tile outlined, on a fixed 0…1 scale, so a
  value means the same in every tile and patches of the padding are not stretched onto the tile.

matplotlib and scipy are imported by the first figure, so code that only scores (validation, sweeps) never loads
them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gac.evaluation.baseline import box_mean
from gac.evaluation.metrics import DN_SCALE, SAR_DB_RANGE, SAR_EDGE_BOX
from gac.io.atomic import atomic_path
from gac.io.tracking import HUB, LOCAL_CHECKPOINT, RANDOM_INIT
from gac.sensors import S1_BANDS, S2_BANDS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The true-colour composite (R, G, B) and its indices in :data:`gac.sensors.S2_BANDS`.
RGB_BANDS: tuple[str, str, str] = ("B04", "B03", "B02")
RGB = tuple(S2_BANDS.index(b) for b in RGB_BANDS)
#: Percentiles of the truth's true-colour reflectance that every optical panel of a row is stretched between.
STRETCH_PERCENTILES: tuple[float, float] = (2.0, 98.0)
#: Percentile of the SAR Sobel magnitude drawn as the "SAR edges" contour.
EDGE_PERCENTILE = 90.0
#: Upper end of an error or change map's colour scale, as a percentile of the map.
ERROR_PERCENTILE = 99.0
#: Output patch size (px) of the Stage 3 decoder, one attention value per patch query.
ATTENTION_PATCH_PX = 16
#: Resolution of the PNGs.
DPI = 100
#: Colour of the SAR-edge contours (visible on grey, magma and true colour).
EDGE_COLOUR = "cyan"

#: Per-tile metric → (format of its value in a title, what it is, better).
_CAPTION: dict[str, tuple[str, str, str]] = {
    "psnr": ("PSNR {:.2f} dB", "PSNR", "higher"),
    "ssim": ("SSIM {:.2f}", "SSIM", "higher"),
    "sam_deg": ("SAM {:.1f}°", "SAM = spectral angle", "lower"),
    "sar_edge": ("SAR-edge {:.2f}", "SAR-edge = optical edge error where the SAR sees edges, 0…1", "lower"),
}
_FONT = 8
#: What a title adds when a prediction comes from random-init weights.
RANDOM_INIT_WARNING = "random-init weights (demo: not a trained model)"


# ------------------------------------------------------------------------------------------------- helpers


def sar_edges(s1_db: np.ndarray) -> np.ndarray:
    """Sobel magnitude (H, W) of the 5×5-smoothed mean of VV and VH, as in
    :func:`gac.evaluation.metrics.sar_edge_agreement`."""
    from scipy import ndimage

    smooth = box_mean(s1_db.astype(np.float64).mean(axis=0))
    return np.hypot(ndimage.sobel(smooth, axis=0, mode="mirror"), ndimage.sobel(smooth, axis=1, mode="mirror"))


def metric_caption(scores: Mapping[str, float] | None) -> tuple[str, str]:
    """The two title lines of a prediction's per-tile scores: ``"PSNR 20.96 dB · SSIM 0.51"``, ``"SAM 7.2° · …"``.

    Metrics missing from ``scores`` are left out; a non-finite value reads ``n/a``.
    """
    scores = scores or {}

    def part(key: str) -> str | None:
        if key not in scores:
            return None
        value = float(scores[key])
        fmt = _CAPTION[key][0]
        return fmt.format(value) if math.isfinite(value) else re.sub(r"\{[^}]*\}", "n/a", fmt)

    lines = [[part("psnr"), part("ssim")], [part("sam_deg"), part("sar_edge")]]
    first, second = (" · ".join(p for p in line if p) for line in lines)
    return first, second


def weights_origin_text(origin: str | None) -> str:
    """A cache's ``weights_origin`` (:func:`gac.io.tracking.weights_origin`, kept in its ``provenance.json``) for a
    title: ``random init``, ``released file <name>`` or ``the hub (pretrained)``; anything else as recorded."""
    if not origin:
        return "unknown origin"
    if origin.startswith(LOCAL_CHECKPOINT):
        return f"released file {Path(origin.removeprefix(LOCAL_CHECKPOINT).strip()).name}"
    return {RANDOM_INIT: RANDOM_INIT, HUB: "the hub (pretrained)"}.get(origin, origin)


def weights_caption(origins: Mapping[str, str | None], splits: Iterable[str]) -> str:
    """A title line naming the split and where each prediction's weights came from, equal origins grouped:
    ``split test · weights: opt_v1, opt_v2, opt_v3 random init — random-init weights (demo: not a trained model)``.

    Args:
        origins: ``{prediction: weights_origin}`` from the caches' provenance (for a refining stage the origin of the
            base its LoRA was trained on, as the stage records it).
        splits: The shown tiles' splits (a catalog's ``split`` column; each named once).
    """
    by_origin: dict[str, list[str]] = {}
    for name, origin in origins.items():
        by_origin.setdefault(weights_origin_text(origin), []).append(name)
    parts = "; ".join(f"{', '.join(names)} {text}" for text, names in by_origin.items())
    warning = f" — {RANDOM_INIT_WARNING}" if RANDOM_INIT in by_origin else ""
    return f"split {', '.join(sorted({str(s) for s in splits}))} · weights: {parts}{warning}"


def band_list(n_bands: int) -> str:
    """The Sentinel-2 bands an ``n_bands`` array holds, runs shortened: ``"B01–B09, B8A, B11, B12"`` for all 12."""
    if n_bands != len(S2_BANDS):
        return f"{n_bands} bands"
    runs: list[list[str]] = []
    for band in S2_BANDS:
        prev = runs[-1][-1] if runs else None
        if prev and prev[1:].isdigit() and band[1:].isdigit() and int(band[1:]) == int(prev[1:]) + 1:
            runs[-1].append(band)
        else:
            runs.append([band])
    return ", ".join(", ".join(r) if len(r) < 3 else f"{r[0]}–{r[-1]}" for r in runs)


def _reflectance(dn: np.ndarray) -> np.ndarray:
    return dn.astype(np.float32) / DN_SCALE


def _rgb(dn: np.ndarray) -> np.ndarray:
    """True colour (H, W, 3) reflectance from 12-band DN."""
    return np.moveaxis(_reflectance(dn[list(RGB)]), 0, -1)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a − b|`` in reflectance, mean over bands: (H, W)."""
    return np.abs(_reflectance(a) - _reflectance(b)).mean(axis=0)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bare(ax: Axes, title: str) -> None:
    ax.set_title(title, fontsize=_FONT)
    ax.set_xticks([])
    ax.set_yticks([])


def _colourbar(fig: Figure, im, ax: Axes | list[Axes], label: str, extend: str = "neither") -> None:
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, extend=extend)
    bar.set_label(label, fontsize=_FONT - 1)
    bar.ax.tick_params(labelsize=_FONT - 1)


def _sar_panel(fig: Figure, ax: Axes, s1_db: np.ndarray, band: str, title: str | None = None) -> None:
    """One polarisation in grey on its fixed dB window, with a ``σ⁰ <band> [dB]`` colourbar."""

    lo, hi = SAR_DB_RANGE[band]
    im = ax.imshow(s1_db[S1_BANDS.index(band)], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    _colourbar(fig, im, ax, f"σ⁰ {band} [dB]", extend="both")
    window = f"{lo:g}…{hi:g}".replace("-", "−")  # typographic minus
    _bare(ax, title or f"Sentinel-1 σ⁰ {band}, {window} dB")


def _error_panels(fig: Figure, axes: list[Axes], maps: Mapping[str, np.ndarray], n_bands: int, cmap: str) -> None:
    """Maps in reflectance (``{label: (H, W)}``, one per axes: an error, a change, a σ), on one colour scale from 0
    to the largest of their :data:`ERROR_PERCENTILE` percentiles, under one labelled colourbar: a colour is the same
    reflectance in each."""
    from matplotlib.colors import Normalize

    top = max(float(np.percentile(m, ERROR_PERCENTILE)) for m in maps.values())
    norm = Normalize(vmin=0.0, vmax=top if top > 0 else 1e-6)
    images = [ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest") for ax, values in
              zip(axes, maps.values(), strict=True)]  # fmt: skip
    for ax, label in zip(axes, maps, strict=True):
        _bare(ax, f"{label}\nmean over {band_list(n_bands)}")
    _colourbar(fig, images[0], axes, f"{' and '.join(maps)}, mean over {n_bands} bands [reflectance]", extend="max")


def _edge_contours(ax: Axes, edges: np.ndarray) -> bool:
    """Draw the SAR-edge contour; ``False`` when the tile has no edges to draw (flat SAR)."""
    level = float(np.percentile(edges, EDGE_PERCENTILE))
    if level <= edges.min():
        return False
    ax.contour(edges, levels=[level], colors=EDGE_COLOUR, linewidths=0.6)
    return True


def _edge_legend(ax: Axes) -> None:
    from matplotlib.lines import Line2D

    handle = Line2D([], [], color=EDGE_COLOUR, linewidth=1.0, label="SAR edges")
    ax.legend(handles=[handle], loc="lower right", fontsize=_FONT - 2, framealpha=0.6)


def _stretch_text(lo: float, hi: float) -> str:
    p_lo, p_hi = STRETCH_PERCENTILES
    return (f"true colour {'/'.join(RGB_BANDS)} (R/G/B), one linear {p_lo:g}–{p_hi:g} % stretch of the truth for "
            f"every optical panel ({lo:.3f}–{hi:.3f} reflectance)")  # fmt: skip


def _edges_text() -> str:
    return (f"{EDGE_COLOUR} contours: SAR edges = {EDGE_PERCENTILE:g}th percentile of the Sobel magnitude of the "
            f"{SAR_EDGE_BOX}×{SAR_EDGE_BOX}-smoothed mean of σ⁰ VV and VH [dB]")  # fmt: skip


def _suptitle(fig: Figure, title: str, *lines: str) -> None:
    fig.suptitle("\n".join(t for t in (title, *lines) if t), fontsize=_FONT + 1)


# ------------------------------------------------------------------------------------------------- figures


def comparison_figure(
    s1_db: np.ndarray,
    preds: Mapping[str, np.ndarray],
    truth: np.ndarray,
    title: str = "",
    scores: Mapping[str, Mapping[str, float]] | None = None,
    *,
    sigma: np.ndarray | None = None,
    origin: str = "",
) -> Figure:
    """σ⁰ VV, σ⁰ VH, each prediction, the truth (true colour, one stretch), ``|last prediction − truth|`` and, when
    ``sigma`` is given, the last prediction's σ on the error map's colour scale.

    Args:
        s1_db: ``(2, H, W)`` backscatter in dB, VV then VH.
        preds: ``{name: (12, H, W) DN}`` in display order, e.g. ``{"opt_v1": …, "opt_v2": …, "opt_v3": …}``; the
            error map is of the last one.
        truth: ``(12, H, W)`` DN of the real Sentinel-2 L2A tile.
        title: First suptitle line (e.g. the patch id).
        scores: ``{name: {metric: value}}`` per-tile metrics (``psnr``, ``ssim``, ``sam_deg``, ``sar_edge``; other
            keys are ignored) shown in each prediction's title.
        sigma: ``(12, H, W)`` DN, the last prediction's 1 σ (its cache's ``sigma``), or ``None`` (no σ panel).
        origin: Second suptitle line: the split and where the weights came from (:func:`weights_caption`).
    """
    if not preds:
        raise ValueError("comparison_figure: no predictions to show")
    scores = scores or {}
    truth_rgb = _rgb(truth)
    lo, hi = (float(v) for v in np.percentile(truth_rgb, STRETCH_PERCENTILES))
    hi = hi if hi > lo else lo + 1e-6
    last = list(preds)[-1]
    panels = {**{name: _rgb(dn) for name, dn in preds.items()}, None: truth_rgb}
    maps = {f"|{last} − truth|": _mean_abs_diff(preds[last], truth)}
    if sigma is not None:
        maps[f"σ of {last}"] = _reflectance(sigma).mean(axis=0)
    n = len(S1_BANDS) + len(panels) + len(maps)
    fig = _new_figure(2.9 * n, 3.7)
    axes = fig.subplots(1, n)
    for ax, band in zip(axes, S1_BANDS, strict=False):
        _sar_panel(fig, ax, s1_db, band)
    for ax, (name, rgb) in zip(axes[len(S1_BANDS) : -len(maps)], panels.items(), strict=True):
        ax.imshow(np.clip((rgb - lo) / (hi - lo), 0, 1), interpolation="nearest")
        if name is None:
            _bare(ax, "truth · Sentinel-2 L2A\n(reference)")
        else:
            first, second = metric_caption(scores.get(name))
            _bare(ax, "\n".join(t for t in (f"{name} · {first}" if first else name, second) if t))
    _error_panels(fig, list(axes[-len(maps) :]), maps, truth.shape[0], "inferno")
    lines = [origin, _stretch_text(lo, hi)]
    if any(scores.get(name) for name in preds):
        legend = "; ".join(f"{what} ({better} is better)" for _, what, better in _CAPTION.values())
        lines.append(f"per-tile scores vs. the truth on reflectance (DN / 10000, clipped 0–1): {legend}")
    _suptitle(fig, title, *lines)
    return fig


def grounding_figure(
    s1_db: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    title: str = "",
    names: tuple[str, str] = ("opt_v2", "opt_v3"),
    *,
    origin: str = "",
) -> Figure:
    """Where Stage 3 changed the image, ``|after − before|`` (mean over bands), against the SAR's edges.

    Args:
        s1_db: ``(2, H, W)`` backscatter in dB, VV then VH.
        before, after: ``(12, H, W)`` DN of Stage 3's input (opt_v2) and output (opt_v3).
        title: First suptitle line (e.g. the patch id).
        names: How ``before`` and ``after`` are called in the labels.
        origin: Second suptitle line: the split and where the weights came from (:func:`weights_caption`).
    """
    edges = sar_edges(s1_db)
    fig = _new_figure(8.2, 4.0)
    axes = fig.subplots(1, 2)
    _sar_panel(fig, axes[0], s1_db, "VV", "Sentinel-1 σ⁰ VV + SAR edges")
    drawn = _edge_contours(axes[0], edges)
    _error_panels(fig, [axes[1]], {f"|{names[1]} − {names[0]}|": _mean_abs_diff(after, before)}, before.shape[0],
                  "magma")  # fmt: skip
    _edge_contours(axes[1], edges)
    if drawn:
        _edge_legend(axes[1])
    what = f"where Stage 3 changed {names[0]} into {names[1]}, against the radar's edges"
    _suptitle(fig, f"{title} — {what}" if title else what, origin,
              _edges_text() + ("" if drawn else " (flat SAR: none)"))  # fmt: skip
    return fig


def attention_figure(
    s1_db: np.ndarray, attention: np.ndarray, title: str = "", patch_px: int = ATTENTION_PATCH_PX, *, origin: str = ""
) -> Figure:
    """Stage 3's share of cross-attention on the S1 tokens, over σ⁰ VV and on the padded model input.

    Args:
        s1_db: ``(2, H, W)`` backscatter in dB, VV then VH.
        attention: ``(h, w)`` map of :meth:`gac.models.grounding.Grounder.cross_attention_maps`, one value in
            ``[0, 1]`` per ``patch_px`` output patch of the padded square input, the tile centred in it. A map too
            small to cover the tile at ``patch_px`` is stretched over the tile instead (and the figure says so).
        title: First suptitle line (e.g. the patch id).
        patch_px: Output patch size of the decoder in pixels.
        origin: Second suptitle line: the split and where the weights came from (:func:`weights_caption`).
    """
    from matplotlib.patches import Rectangle

    h, w = s1_db.shape[-2:]
    attention = np.asarray(attention, dtype=np.float32)
    ah, aw = attention.shape[-2:]
    padded = ah * patch_px >= h and aw * patch_px >= w
    if padded:
        top, left = (ah * patch_px - h) // 2, (aw * patch_px - w) // 2  # as geometry.margins centres it
        extent = (-0.5 - left, -0.5 - left + aw * patch_px, -0.5 - top + ah * patch_px, -0.5 - top)
        where = (f"per {patch_px} px output patch query; white box: the {h} × {w} px tile in the "
                 f"{ah * patch_px} × {aw * patch_px} px padded model input")  # fmt: skip
    else:
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        where = f"per output patch query ({ah} × {aw} map stretched over the {h} × {w} px tile)"
    style = {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0, "extent": extent, "interpolation": "nearest"}
    fig = _new_figure(8.2, 4.2)
    axes = fig.subplots(1, 2)
    _sar_panel(fig, axes[0], s1_db, "VV", "Sentinel-1 σ⁰ VV + attention share (tile)")
    axes[0].imshow(attention, alpha=0.45, **style)
    axes[0].set_xlim(-0.5, w - 0.5)
    axes[0].set_ylim(h - 0.5, -0.5)
    im = axes[1].imshow(attention, **style)
    axes[1].add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="white", linewidth=1.0))
    _colourbar(fig, im, axes[1], "share of cross-attention on S1 tokens (0 = optical only, 1 = SAR only)")
    _bare(axes[1], "share on S1 tokens, whole model input")
    what = "share of cross-attention on S1 tokens, last decoder layer, mean over heads"
    _suptitle(fig, f"{title} — {what}" if title else what, origin, where)
    return fig


def curve_figure(steps: np.ndarray, values: np.ndarray, metric: str, title: str = "") -> Figure:
    """One training curve: ``metric`` (a Lightning key such as ``val/psnr``) against the optimizer step.

    One metric per figure, on its own axis: a loss of ~0.2 and a PSNR of ~19 dB share no useful scale. The caller
    passes only the steps that logged the metric (Lightning's CSV leaves the other cells blank), so no blank is drawn
    as 0; a single point is drawn as a marker.
    """
    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    fig = _new_figure(4.8, 3.2)
    ax = fig.subplots()
    ax.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3, linewidth=1.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("optimizer step", fontsize=_FONT)
    ax.set_ylabel(metric, fontsize=_FONT)
    ax.tick_params(labelsize=_FONT - 1)
    ax.grid(alpha=0.3)
    _suptitle(fig, f"{title} — {metric}" if title else metric)
    return fig


# ------------------------------------------------------------------------------------------------- writing


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` atomically (:func:`gac.io.atomic.atomic_path`; format from the suffix) at :data:`DPI`.

    A PNG keeps the suptitle as its ``Title`` text chunk, so the patch, split and weights' origin stay readable
    from the file (an image viewer's properties, ``exiftool``, PIL's ``Image.text``) once it travels alone.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    metadata = {"Title": fig.get_suptitle()} if fmt == "png" else None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=fmt, metadata=metadata)
    return path


def save_comparison(
    path: str | Path,
    s1_db: np.ndarray,
    preds: Mapping[str, np.ndarray],
    truth: np.ndarray,
    title: str = "",
    scores: Mapping[str, Mapping[str, float]] | None = None,
    *,
    sigma: np.ndarray | None = None,
    origin: str = "",
) -> Path:
    """:func:`comparison_figure` written to ``path``."""
    return save_figure(comparison_figure(s1_db, preds, truth, title, scores, sigma=sigma, origin=origin), path)


def save_grounding(path: str | Path, s1_db: np.ndarray, before: np.ndarray, after: np.ndarray, title: str = "", *,
                   origin: str = "") -> Path:  # fmt: skip
    """:func:`grounding_figure` written to ``path``."""
    return save_figure(grounding_figure(s1_db, before, after, title, origin=origin), path)


def save_attention(path: str | Path, s1_db: np.ndarray, attention: np.ndarray, title: str = "", *,
                   origin: str = "") -> Path:  # fmt: skip
    """:func:`attention_figure` written to ``path``."""
    return save_figure(attention_figure(s1_db, attention, title, origin=origin), path)
