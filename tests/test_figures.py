"""gac.evaluation.figures: every panel says what it shows, in what units; the PNGs are written whole.

Structure is asserted on the matplotlib objects (titles, colourbars, colour limits, the arrays handed to imshow),
not on pixels; small synthetic tiles (12 × 120 × 120 DN, 2 × 120 × 120 dB) stand in for real ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from gac.evaluation import figures
from gac.evaluation.metrics import SAR_DB_RANGE

H = W = 120
NAMES = ("opt_v1", "opt_v2", "opt_v3")


@pytest.fixture(scope="module")
def tile():
    """A two-field tile: SAR and optical both change at x = 60, so there is one real edge."""
    rng = np.random.default_rng(0)
    field = (np.arange(W)[None, :] >= W // 2).astype(np.float32) * np.ones((H, 1), np.float32)
    truth = (1000 + 1500 * field[None] + rng.normal(0, 80, (12, H, W))).clip(0, None).astype(np.uint16)
    s1 = np.stack([-15 + 6 * field, -22 + 5 * field]) + rng.normal(0, 1.0, (2, H, W))
    preds = {name: (truth + rng.normal(0, 400 / (k + 1), truth.shape)).clip(0, None).astype(np.float32)
             for k, name in enumerate(NAMES)}  # fmt: skip
    scores = {name: {"psnr": 18.5 + k, "ssim": 0.4 + 0.1 * k, "sam_deg": 9.0 - k, "sar_edge": 0.3, "country": "AT"}
              for k, name in enumerate(NAMES)}  # fmt: skip
    return {"s1": s1.astype(np.float32), "truth": truth, "preds": preds, "scores": scores}


def by_title(fig, text: str):
    """The one image axes whose title contains ``text``."""
    found = [ax for ax in fig.axes if ax.get_title().startswith(text)]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes]
    return found[0]


def colourbar_label(ax) -> str:
    return ax.images[0].colorbar.ax.get_ylabel()


# ------------------------------------------------------------------------------------------------ comparison


def test_comparison_titles_name_the_metrics(tile):
    fig = figures.comparison_figure(tile["s1"], tile["preds"], tile["truth"], "P_1_2", tile["scores"])
    for k, name in enumerate(NAMES):
        title = by_title(fig, f"{name} ·").get_title()
        assert f"PSNR {18.5 + k:.2f} dB" in title and f"SSIM {0.4 + 0.1 * k:.2f}" in title, title
        assert f"SAM {9.0 - k:.1f}°" in title and "SAR-edge 0.30" in title, title
    assert by_title(fig, "truth").get_title() == "truth · Sentinel-2 L2A\n(reference)"
    sup = fig.get_suptitle()
    assert sup.startswith("P_1_2") and "higher is better" in sup and "lower is better" in sup


def test_comparison_states_composite_and_one_stretch(tile):
    truth = tile["truth"]
    fig = figures.comparison_figure(tile["s1"], tile["preds"], truth, "P_1_2", tile["scores"])
    sup = fig.get_suptitle()
    assert "true colour B04/B03/B02" in sup and "2–98 % stretch of the truth" in sup, sup
    lo, hi = np.percentile(np.moveaxis(truth[[3, 2, 1]] / 10000.0, 0, -1), [2, 98])
    assert f"{lo:.3f}–{hi:.3f} reflectance" in sup

    # one stretch for the row: a prediction twice as bright as the truth is shown brighter, not rescaled
    brighter = {"opt_v3": truth.astype(np.float32) * 2}
    fig = figures.comparison_figure(tile["s1"], brighter, truth)
    shown_pred = by_title(fig, "opt_v3").images[0].get_array()
    shown_truth = by_title(fig, "truth").images[0].get_array()
    assert shown_pred.mean() > shown_truth.mean() + 0.3
    assert float(shown_truth.min()) >= 0.0 and float(shown_truth.max()) <= 1.0


def test_comparison_sar_panels_are_vv_and_vh_in_fixed_db(tile):
    fig = figures.comparison_figure(tile["s1"], tile["preds"], tile["truth"], "P_1_2", tile["scores"])
    for k, band in enumerate(("VV", "VH")):
        ax = by_title(fig, f"Sentinel-1 σ⁰ {band}, ")
        im = ax.images[0]
        lo = f"{SAR_DB_RANGE[band][0]:g}".replace("-", "−")
        assert ax.get_title() == f"Sentinel-1 σ⁰ {band}, {lo}…0 dB"
        assert colourbar_label(ax) == f"σ⁰ {band} [dB]"
        assert im.get_clim() == SAR_DB_RANGE[band]
        assert im.get_cmap().name == "gray"
        np.testing.assert_array_equal(im.get_array(), tile["s1"][k])  # band order VV, VH


def test_comparison_error_map_names_its_bands_and_unit(tile):
    truth = tile["truth"]
    off = {"opt_v3": truth.astype(np.float32) + 500}  # 500 DN everywhere = 0.05 reflectance
    fig = figures.comparison_figure(tile["s1"], off, truth)
    ax = by_title(fig, "|opt_v3 − truth|")
    assert colourbar_label(ax) == "|opt_v3 − truth|, mean over 12 bands [reflectance]"
    assert "B01–B08, B8A, B09, B11, B12" in ax.get_title()
    np.testing.assert_allclose(ax.images[0].get_array(), 0.05, atol=1e-5)
    assert ax.images[0].get_clim()[0] == 0.0


def test_comparison_sigma_panel_shares_the_error_maps_scale_and_unit(tile):
    truth = tile["truth"]
    off = {"opt_v3": truth.astype(np.float32) + 500}  # |error| 0.05 reflectance everywhere
    sigma = np.full_like(truth, 1500)  # σ 0.15: the larger map sets the shared top
    sigma[:, :60] = 300
    fig = figures.comparison_figure(tile["s1"], off, truth, sigma=sigma)
    error, unsure = by_title(fig, "|opt_v3 − truth|"), by_title(fig, "σ of opt_v3")
    assert fig.axes.index(unsure) == fig.axes.index(error) + 1  # next to the error map
    assert "B01–B08, B8A, B09, B11, B12" in unsure.get_title()
    np.testing.assert_allclose(unsure.images[0].get_array(), sigma.mean(axis=0) / 10000, atol=1e-6)
    assert unsure.images[0].norm is error.images[0].norm  # one colour scale: a colour is one reflectance in both
    assert error.images[0].get_clim() == (0.0, pytest.approx(0.15))
    label = "|opt_v3 − truth| and σ of opt_v3, mean over 12 bands [reflectance]"
    assert colourbar_label(error) == label
    bars = [ax for ax in fig.axes if ax.get_ylabel().endswith("[reflectance]")]
    assert len(bars) == 1, "one colourbar for both maps"
    without = figures.comparison_figure(tile["s1"], off, truth)
    assert not [ax for ax in without.axes if ax.get_title().startswith("σ of")]
    assert len(without.axes) == len(fig.axes) - 1


def test_titles_name_the_weights_origin_and_the_split(tile, tmp_path):
    origins = {"opt_v1": "random init", "opt_v2": "local checkpoint: /w/Prithvi_EO_V2_tiny_TL.pt",
               "opt_v3": "hub (pretrained)"}  # fmt: skip
    caption = figures.weights_caption(origins, ["test", "test"])
    assert caption == ("split test · weights: opt_v1 random init; opt_v2 released file Prithvi_EO_V2_tiny_TL.pt; "
                       "opt_v3 the hub (pretrained) — random-init weights (demo: not a trained model)")  # fmt: skip
    same = figures.weights_caption(dict.fromkeys(NAMES, "hub (pretrained)"), ["validation", "test"])
    assert same == "split test, validation · weights: opt_v1, opt_v2, opt_v3 the hub (pretrained)"
    assert "unknown origin" in figures.weights_caption({"opt_v1": None}, ["test"])
    s1, preds = tile["s1"], tile["preds"]
    made = [
        figures.comparison_figure(s1, preds, tile["truth"], "P_1_2", origin=caption),
        figures.grounding_figure(s1, preds["opt_v2"], preds["opt_v3"], "P_1_2", origin=caption),
        figures.attention_figure(s1, np.full((14, 14), 0.3), "P_1_2", origin=caption),
    ]
    for fig in made:
        first, second = fig.get_suptitle().split("\n")[:2]
        assert first.startswith("P_1_2") and second == caption, fig.get_suptitle()
    path = figures.save_comparison(tmp_path / "c.png", s1, preds, tile["truth"], "P_1_2", origin=caption)
    with Image.open(path) as img:
        assert img.text["Title"].split("\n")[1] == caption  # the PNG keeps its title when it travels alone


def test_comparison_without_scores_names_the_panels_only(tile):
    fig = figures.comparison_figure(tile["s1"], tile["preds"], tile["truth"])
    assert by_title(fig, "opt_v1").get_title() == "opt_v1"
    assert "better" not in fig.get_suptitle()
    with pytest.raises(ValueError):
        figures.comparison_figure(tile["s1"], {}, tile["truth"])


# ------------------------------------------------------------------------------------------ grounding, attention


def test_grounding_labels_its_colourbar_and_contours(tile):
    fig = figures.grounding_figure(tile["s1"], tile["preds"]["opt_v2"], tile["preds"]["opt_v3"], "P_1_2")
    change = by_title(fig, "|opt_v3 − opt_v2|")
    assert colourbar_label(change) == "|opt_v3 − opt_v2|, mean over 12 bands [reflectance]"
    sar = by_title(fig, "Sentinel-1 σ⁰ VV")
    assert colourbar_label(sar) == "σ⁰ VV [dB]"
    sup = fig.get_suptitle()
    assert "contours: SAR edges" in sup and "Sobel" in sup and "VV and VH" in sup, sup
    assert [t.get_text() for t in change.get_legend().get_texts()] == ["SAR edges"]
    assert sar.collections and change.collections  # the contours are drawn on both panels


def test_grounding_on_flat_sar_says_there_are_no_edges(tile):
    flat = np.full((2, H, W), -12.0, np.float32)
    fig = figures.grounding_figure(flat, tile["preds"]["opt_v2"], tile["preds"]["opt_v3"])
    assert "flat SAR: none" in fig.get_suptitle()
    assert by_title(fig, "|opt_v3 − opt_v2|").get_legend() is None


def test_attention_figure_says_what_it_shows(tile):
    grid = 224 // 16
    attention = np.linspace(0, 1, grid * grid).reshape(grid, grid)
    fig = figures.attention_figure(tile["s1"], attention, "P_1_2")
    sup = fig.get_suptitle()
    for words in ("share of cross-attention on S1 tokens", "last decoder layer", "mean over heads",
                  "per 16 px output patch query", "224 × 224 px padded model input"):  # fmt: skip
        assert words in sup, sup
    ax = by_title(fig, "share on S1 tokens, whole model input")
    im = ax.images[0]
    assert im.get_clim() == (0.0, 1.0)
    assert colourbar_label(ax).startswith("share of cross-attention on S1 tokens")
    margin = (224 - W) // 2  # the tile is centred in the padded input, as gac.models.geometry pads it
    assert im.get_extent() == [-0.5 - margin, 223.5 - margin, 223.5 - margin, -0.5 - margin]
    overlay = by_title(fig, "Sentinel-1 σ⁰ VV + attention share (tile)")
    assert tuple(overlay.get_xlim()) == (-0.5, W - 0.5)
    assert colourbar_label(overlay) == "σ⁰ VV [dB]"


def test_attention_map_too_small_for_the_patch_grid_is_stretched(tile):
    fig = figures.attention_figure(tile["s1"], np.full((3, 3), 0.5))
    assert "stretched over the 120 × 120 px tile" in fig.get_suptitle()
    im = by_title(fig, "share on S1 tokens, whole model input").images[0]
    assert im.get_extent() == [-0.5, W - 0.5, H - 0.5, -0.5]


# ------------------------------------------------------------------------------------------------ helpers


def test_metric_caption_and_band_list():
    assert figures.metric_caption({"psnr": 20.961, "ssim": 0.512}) == ("PSNR 20.96 dB · SSIM 0.51", "")
    assert figures.metric_caption({"sam_deg": math.nan, "other": 1}) == ("", "SAM n/a°")
    assert figures.metric_caption(None) == ("", "")
    assert figures.band_list(12) == "B01–B08, B8A, B09, B11, B12"
    assert figures.band_list(4) == "4 bands"


# ------------------------------------------------------------------------------------------------ writing


def test_save_writes_whole_pngs_of_sensible_size(tile, tmp_path):
    s1, truth, preds = tile["s1"], tile["truth"], tile["preds"]
    grid = np.full((14, 14), 0.3)
    paths = [
        figures.save_comparison(tmp_path / "c.png", s1, preds, truth, "P_1_2", tile["scores"]),
        figures.save_grounding(tmp_path / "g.png", s1, preds["opt_v2"], preds["opt_v3"], "P_1_2"),
        figures.save_attention(tmp_path / "a.png", s1, grid, "P_1_2"),
    ]
    sizes = {}
    for path in paths:
        with Image.open(path) as img:
            img.verify()  # a complete, uncorrupted PNG
        with Image.open(path) as img:
            assert img.format == "PNG"
            sizes[path.name] = img.size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png", "g.png"]  # no .tmp- leftovers
    width, height = sizes["c.png"]
    assert 1500 <= width <= 3000 and 250 <= height <= 600 and width > 4 * height  # one row of 7 panels
    for name in ("g.png", "a.png"):
        width, height = sizes[name]
        assert 600 <= width <= 1200 and 300 <= height <= 700, (name, sizes[name])
    figures.save_attention(tmp_path / "a.png", s1, grid)  # overwriting an existing figure works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png", "g.png"]
