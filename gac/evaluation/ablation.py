"""Evaluation over one split: the ablation table, per-group tables, pictures, GeoTIFFs, and the registry's eval tags.

Rows of the ablation (each scored against the catalog's real Sentinel-2 tile with
:func:`gac.evaluation.metrics.per_tile`):

==============  =============================================================
``stage1``      opt_v1, TerraMind generation from SAR (cache ``<stage1.out>``)
``stage1+2``    opt_v2, after the Prithvi-EO + LoRA refinement (``<stage2.out>/opt_v2``)
``full``        opt_v3, after the TerraMind cross-attention grounding (``<stage3.out>/opt_v3``)
``baseline``    the per-pixel ridge regression of :mod:`gac.evaluation.baseline`, fitted here on the catalog's train
split
``truth``       the real Sentinel-2 tile scored against itself: what a perfect model gets (every target must be met
                here, or the target is unreachable by definition)
==============  =============================================================

Rows whose cache has a predicted σ (``sigma``: Stage 2/3's calibrated Gaussian head, Stage 1's spread over several
draws) are also scored for calibration (:mod:`gac.evaluation.uncertainty`: coverage of the 68 % and 95 % intervals,
UCE, Spearman of |error| and σ per pixel and per tile, sharpness, NLL), in one streaming pass with the other metrics;
``coverage95``, ``uce`` and ``spearman_pixel`` of ``full`` go into the metrics JSON.

``block_periodicity`` (:func:`gac.evaluation.metrics.block_periodicity`, lower is better, natural images < 0) is scored
on what
each row *adds to its input*: ``opt_v2 − opt_v1`` for ``stage1+2``, ``opt_v3 − opt_v2`` for ``full`` — a decoder that
paints 16 px token blocks scores near +1 there — and on the image itself for the rows without an image input
(``stage1``, ``baseline``, ``truth``: the truth's value is the reference of a real image).

Tiles whose target is flagged cloudy or snowy (``data.exclude``) are not scored; how many each flag removed is
reported (``provenance.excluded``). ``leakage`` compares Stage 2's gain over opt_v1 on the train tiles it was fitted on
with its gain on the scored split (Stage 3 trains on opt_v2 of train tiles, which are better than what unseen tiles get;
see the README "Method").

All rows are scored on the same tiles: the split's tiles present in *every* cache (a stage may reject a tile; how
many each cache lacks is reported). A row's value of a metric is the mean of its per-tile values; the same means are
given per ``country`` and per ``season``. ``seconds_per_tile`` comes from each cache's timing file (written beside it
by the stage that made it, see :mod:`gac.io.provenance`); the baseline's is measured here.

Outputs (``out_dir``, default ``evaluate.out``, replaced as a whole):

* ``plots/ablation.csv`` (rows × metrics, for ``dvc plots``), ``plots/groups.csv``, ``plots/per_tile.csv``;
* ``figures/<patch_id>_compare.png``: σ⁰ VV and VH (fixed dB windows), opt_v1, opt_v2, opt_v3 titled with their
  per-tile PSNR, SSIM, SAM and SAR-edge scores, the truth (true colour B04/B03/B02, one stretch for the whole row:
  the truth's 2–98 % percentiles) and the error ``|opt_v3 − truth|`` (mean over the 12 bands, reflectance), with
  opt_v3's σ beside it on the same colour scale when its cache has ``sigma``;
* ``figures/<patch_id>_grounding.png``: ``|opt_v3 − opt_v2|`` with the SAR's Sobel edges as contours (where Stage 3
  changed the image, and whether that is where the radar sees boundaries); ``figures/<patch_id>_attention.png`` when
  an attention-map hook is given. Every figure states its composite, stretch, units and bands
  (:mod:`gac.evaluation.figures`), and its title the split and each cache's weights origin (its provenance);
* ``geotiff/<patch_id>_opt_v3.tif`` with the tile's CRS and transform (and σ bands when opt_v3 has ``sigma``);
  ``baseline.npz`` (the fitted baseline);

* ``details.json``: everything — every row × metric, the per-group tables, ``leakage`` and ``provenance`` (weights
  origin, data source, split, tile counts, the MLflow run);

plus the metrics JSON (``metrics_path``, ``dvc metrics show``), which holds only the :func:`headline` figures: DVC
prints one column per key of every metrics file, and the whole table made ``dvc metrics show`` hundreds of columns
wide; one MLflow run with everything; and ``eval.<metric>`` tags plus an updated model card on every registered model
version named in a cache's provenance (for :mod:`gac.mlops.promote`, which reads those tags, not the JSON).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gac.config import Params
from gac.data.catalog import rejected_in, rejected_note
from gac.data.metadata import flagged, keep_unflagged
from gac.errors import GacError
from gac.evaluation import metrics
from gac.evaluation.baseline import fit_baseline
from gac.evaluation.direction import higher_is_better
from gac.evaluation.figures import save_attention, save_comparison, save_grounding, weights_caption
from gac.evaluation.metrics import lpips_metric
from gac.evaluation.uncertainty import FIGURES, NOMINAL, CalibrationScore, Z, from_dn
from gac.io import tracking
from gac.io.atomic import atomic_path, write_text
from gac.io.geotiff import export_geotiff
from gac.io.provenance import read_provenance
from gac.io.store import SIGMA, ShardStore
from gac.pipeline import GENERATING, metrics_beside, output
from gac.pipeline import StageName as S

#: Ablation row → the stage whose cache it reads (``None``: computed here).
ROWS: dict[str, str | None] = {
    S.STAGE1: S.STAGE1, "stage1+2": S.STAGE2, "full": S.STAGE3, "baseline": None, "truth": None,
}  # fmt: skip
#: The row whose output each stage row refines: its block periodicity is scored on the difference.
INPUT_ROW: dict[str, str] = {"stage1+2": S.STAGE1, "full": "stage1+2"}
#: Cache name of each stage's output, for labels.
LABELS: dict[str, str] = {s: output(s) for s in GENERATING}
#: Index columns the per-group tables are made over.
GROUPS: tuple[str, ...] = ("country", "season")
#: Metric keys of :func:`gac.evaluation.metrics.per_tile` in table order (``lpips`` is added when configured).
METRICS: tuple[str, ...] = (
    "psnr", "ssim", "ms_ssim", "sam_deg", "mae", "rmse", "ndvi_err", "sar_edge", "block_periodicity",
)  # fmt: skip
#: Row → the metrics of it the metrics JSON holds (:func:`headline`): the promotion targets and block periodicity of
#: the full pipeline and of Stage 1+2, and the truth's block periodicity (a real image's value, the reference; its
#: other metrics are perfect by construction).
HEADLINE: dict[str, tuple[str, ...]] = {
    "full": ("psnr", "ssim", "sam_deg", "sar_edge", "block_periodicity"),
    "stage1+2": ("psnr", "ssim", "sam_deg", "sar_edge", "block_periodicity"),
    # the truth scored as a model: its SAR-edge shows the promotion target is reachable; its block periodicity is
    # the reference of a real image
    "truth": ("sar_edge", "block_periodicity"),
}
#: The calibration figures the metrics JSON holds for the rows of :data:`HEADLINE_SIGMA_ROWS` that have σ: is the 95 %
#: interval a 95 % interval, how far predicted variances are from the errors', and does σ rank the errors.
HEADLINE_SIGMA: tuple[str, ...] = ("coverage95", "uce", "spearman_pixel")
HEADLINE_SIGMA_ROWS: tuple[str, ...] = ("full",)
#: File in the output folder holding every figure of the evaluation.
DETAILS = "details.json"

AttentionMaps = Callable[[np.ndarray, np.ndarray], np.ndarray]


def metric_key(row: str, metric: str) -> str:
    """MLflow metric name of a row's metric, ``<row>.<metric>`` (``+`` is not allowed in MLflow names → ``_``)."""
    return f"{row.replace('+', '_')}.{metric}"


# ------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Cache:
    """One stage's output store and its ``provenance.json``."""

    stage: str
    store: ShardStore
    provenance: dict[str, Any]

    @property
    def registered(self) -> tuple[str, str] | None:
        """``(registered model, version)`` the cache was made with, if it is in the registry."""
        name, version = self.provenance.get("registered_model"), self.provenance.get("version")
        uri = self.provenance.get("model_uri") or ""
        if (name is None or version is None) and uri.startswith("models:/") and uri.count("/") == 2:
            name, version = uri.removeprefix("models:/").split("/")  # models:/<name>/<version>
        return (str(name), str(version)) if name and version else None


def cache_roots(cfg: Params) -> dict[str, Path]:
    """Where the stages write their caches: opt_v1 is Stage 1's whole output folder; opt_v2 and opt_v3 live inside
    the training stages' folders, beside their checkpoints and logs (as ``gac stage2``/``gac stage3`` and ``dvc.yaml``
    have them)."""
    return {S.STAGE1: Path(cfg.stage1.out), S.STAGE2: Path(cfg.stage2.out) / LABELS[S.STAGE2],
            S.STAGE3: Path(cfg.stage3.out) / LABELS[S.STAGE3]}  # fmt: skip


def open_caches(cfg: Params) -> dict[str, Cache]:
    """The three stage caches of ``params.yaml`` (a missing one is a one-line error)."""
    caches = {}
    for stage, root in cache_roots(cfg).items():
        store = ShardStore(root)
        store.index  # noqa: B018 - raises GacError naming the folder when the stage has not run
        caches[stage] = Cache(stage, store, read_provenance(root, stage))
    return caches


def common_tiles(
    catalog: ShardStore, caches: dict[str, Cache], split: str, exclude: Sequence[str] = ()
) -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    """Unflagged catalog rows of ``split`` present in every cache, sorted by patch id; what each cache lacks and
    how many tiles each ``exclude`` flag removed."""
    index = catalog.index
    rows = index[index["split"] == split].sort_values("patch_id").reset_index(drop=True)
    if rows.empty:
        raise GacError(f"{catalog.root}: no '{split}' tiles in the catalog (check evaluate.split and catalog.splits)")
    excluded = {flag: int(mask.sum()) for flag, mask in flagged(rows, exclude).items()}
    rows = keep_unflagged(rows, exclude).reset_index(drop=True)
    if rows.empty:
        raise GacError(f"every '{split}' tile is flagged {excluded}: nothing to score (see data.exclude)")
    present = {stage: rows["patch_id"].isin(set(c.store.index["patch_id"])) for stage, c in caches.items()}
    missing = {LABELS[stage]: int((~mask).sum()) for stage, mask in present.items()}
    keep = np.logical_and.reduce(list(present.values()))
    if not keep.any():
        raise GacError(f"none of the {len(rows)} '{split}' tiles is in every cache (missing: {missing}); rerun stages")
    return rows[keep].reset_index(drop=True), missing, excluded


# ------------------------------------------------------------------------------------------------ scoring


def score(
    rows: pd.DataFrame,
    catalog: ShardStore,
    caches: dict[str, Cache],
    baseline=None,
    batch_size: int = 16,
    lpips_fn=None,
) -> tuple[pd.DataFrame, float, dict[str, CalibrationScore]]:
    """Per-tile metrics of every row (long format: one line per tile and row), the baseline's seconds per tile, and
    the streaming calibration score of every row whose cache has a predicted σ (key ``sigma``).

    A row with σ gets the per-tile figures of :meth:`gac.evaluation.uncertainty.CalibrationScore.update` as extra
    columns (NaN on the other rows); its split-level figures come from :func:`calibration_table`.
    """
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    aligned = {stage: c.store.rows_for(rows["patch_id"]) for stage, c in caches.items()}
    calibration = {row: CalibrationScore() for row, stage in ROWS.items()
                   if stage is not None and caches[stage].store.has("sigma")}  # fmt: skip
    frames, baseline_seconds = [], 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start : start + batch_size]
        s1 = catalog.read("s1", chunk)
        preds = {row: caches[stage].store.read("opt", aligned[stage].iloc[start : start + batch_size])
                 for row, stage in ROWS.items() if stage is not None}  # fmt: skip
        if baseline is not None:
            t0 = time.perf_counter()
            preds["baseline"] = baseline.predict(s1)
            baseline_seconds += time.perf_counter() - t0
        preds["truth"] = catalog.read("s2", chunk)
        tensors = {row: torch.from_numpy(pred.astype(np.float32)).to(device) for row, pred in preds.items()}
        truth, s1_t = tensors["truth"], torch.from_numpy(s1).to(device)
        meta = pd.DataFrame({"patch_id": chunk["patch_id"].to_numpy(),
                             **{g: chunk[g].to_numpy() if g in chunk else "unknown" for g in GROUPS}})  # fmt: skip
        sigmas = {row: caches[ROWS[row]].store.read("sigma", aligned[ROWS[row]].iloc[start : start + batch_size])
                  for row in calibration}  # fmt: skip
        for row, pred in tensors.items():
            values = metrics.per_tile(pred, truth, s1_t, lpips_fn)
            if row in calibration:
                sigma = torch.from_numpy(sigmas[row].astype(np.float32)).to(device)
                values |= calibration[row].update(*from_dn(pred, sigma, truth))
            added = metrics.to_reflectance(pred)
            if row in INPUT_ROW:
                added = added - metrics.to_reflectance(tensors[INPUT_ROW[row]])
            values["block_periodicity"] = metrics.block_periodicity(added).cpu()
            frames.append(meta.assign(row=row, **{k: v.numpy() for k, v in values.items()}))
    per_tile = pd.concat(frames, ignore_index=True)
    return per_tile, baseline_seconds / len(rows), calibration


def calibration_table(per_tile: pd.DataFrame, calibration: dict[str, CalibrationScore]) -> dict[str, dict[str, float]]:
    """``{row: {figure: value}}`` of the rows with σ (:data:`gac.evaluation.uncertainty.FIGURES`)."""
    out = {}
    for row, scorer in calibration.items():
        sub = per_tile[per_tile["row"] == row]
        out[row] = scorer.summary({k: sub[k].to_numpy() for k in (*Z, "sharpness", "nll", "abs_err", "spearman_pixel")})
    return out


def summarise(per_tile: pd.DataFrame, metric_names: list[str]) -> dict[str, dict[str, float]]:
    """``{row: {metric: mean over tiles, tiles: n}}`` in :data:`ROWS` order."""
    out = {}
    for row in ROWS:
        sub = per_tile[per_tile["row"] == row]
        if len(sub):
            out[row] = {m: float(sub[m].mean()) for m in metric_names} | {"tiles": len(sub)}
    return out


def group_tables(per_tile: pd.DataFrame, metric_names: list[str]) -> dict[str, dict[str, dict]]:
    """``{group column: {value: {row: {metric: mean}}}}`` for :data:`GROUPS`."""
    return {
        group: {str(value): summarise(sub, metric_names) for value, sub in per_tile.groupby(group, sort=True)}
        for group in GROUPS
    }


def format_table(table: dict[str, dict[str, float]], metric_names: list[str]) -> str:
    """The ablation as a plain aligned text table (one line per row), with the direction of each metric below."""

    columns = ["row", "tiles", *metric_names, "seconds_per_tile"]
    cells = [columns] + [[row] + [_cell(values.get(c)) for c in columns[1:]] for row, values in table.items()]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]  # fmt: skip
    up = [m for m in metric_names if higher_is_better(m)]
    down = [m for m in metric_names if not higher_is_better(m) and m not in NOMINAL]
    near = [f"{m} ({NOMINAL[m]:.3g})" for m in metric_names if m in NOMINAL]
    lines.append(f"higher is better: {', '.join(up)}; lower is better: {', '.join(down)}"
                 + (f"; best at the nominal level: {', '.join(near)}" if near else ""))  # fmt: skip
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def headline(details: dict[str, Any]) -> dict[str, Any]:
    """The metrics JSON's content from :func:`evaluate`'s result: :data:`HEADLINE`, the number of tiles scored and
    the leakage gap in dB (when there are train tiles to measure it on)."""
    out: dict[str, Any] = {row: {m: details[row].get(m) for m in names} for row, names in HEADLINE.items()
                           if row in details}  # fmt: skip
    for row in HEADLINE_SIGMA_ROWS:  # the calibration headline, where the row has σ
        if row in out and details[row].get("coverage95") is not None:
            out[row] |= {m: details[row].get(m) for m in HEADLINE_SIGMA}
    out["tiles"] = details["provenance"]["tiles_evaluated"]
    if details.get("leakage"):
        out["leakage_gap_db"] = details["leakage"]["gap_db"]
    return out


def _finite(data: Any) -> Any:
    """Replace NaN/inf by ``None`` recursively (JSON has no NaN; DVC and MLflow reject it)."""
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


# ------------------------------------------------------------------------------------------------ pictures


def visualise(out: Path, rows: pd.DataFrame, catalog: ShardStore, caches: dict[str, Cache], per_tile: pd.DataFrame,
              attention_maps: AttentionMaps | None = None) -> list[str]:  # fmt: skip
    """Pictures and opt_v3 GeoTIFFs of ``rows``; returns their patch ids.

    Every figure's title names the split and where each cache's weights came from (its provenance); the comparison
    shows opt_v3's σ beside its error when the cache has ``sigma``.
    """

    if rows.empty:
        return []
    (out / "figures").mkdir(parents=True, exist_ok=True)
    s1, truth = catalog.read("s1", rows), catalog.read("s2", rows)
    opts = {stage: c.store.read("opt", c.store.rows_for(rows["patch_id"])) for stage, c in caches.items()}
    attention = attention_maps(s1, opts[S.STAGE2]) if attention_maps is not None else None
    scores = per_tile.set_index(["patch_id", "row"])
    sigma = caches[S.STAGE3].store.read_optional(SIGMA, rows["patch_id"])
    origin = weights_caption({LABELS[s]: c.provenance.get("weights_origin") for s, c in caches.items()}, rows["split"])
    shown = {row: LABELS[stage] for row, stage in ROWS.items() if stage is not None}  # ablation row -> opt_vN
    for i, pid in enumerate(rows["patch_id"]):
        named = {label: opts[ROWS[row]][i] for row, label in shown.items()}
        tile_scores = {label: scores.loc[(pid, row)].to_dict() for row, label in shown.items()}
        title = " · ".join([pid, *(str(rows[g].iloc[i]) for g in GROUPS if g in rows)])  # where and when
        save_comparison(out / "figures" / f"{pid}_compare.png", s1[i], named, truth[i], title, tile_scores,
                        sigma=None if sigma is None else sigma[i], origin=origin)  # fmt: skip
        save_grounding(out / "figures" / f"{pid}_grounding.png", s1[i], opts[S.STAGE2][i], opts[S.STAGE3][i], title,
                       origin=origin)  # fmt: skip
        if attention is not None:
            save_attention(out / "figures" / f"{pid}_attention.png", s1[i], np.asarray(attention[i]), title,
                           origin=origin)  # fmt: skip
        export_geotiff(caches[S.STAGE3].store.root, pid, out / "geotiff" / f"{pid}_opt_v3.tif")
    return list(rows["patch_id"])


# ----------------------------------------------------------------------------------------------- the stage


def _write_csvs(out: Path, table: dict, groups: dict, per_tile: pd.DataFrame) -> None:
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"row": r, **v} for r, v in table.items()]).to_csv(plots / "ablation.csv", index=False)
    flat = [{"group": g, "value": val, "row": r, **m} for g, by in groups.items() for val, t in by.items()
            for r, m in t.items()]  # fmt: skip
    pd.DataFrame(flat).to_csv(plots / "groups.csv", index=False)
    per_tile.to_csv(plots / "per_tile.csv", index=False)


def leakage_gap(
    catalog: ShardStore, caches: dict[str, Cache], per_tile: pd.DataFrame, exclude: Sequence[str], batch_size: int
) -> dict[str, float]:
    """Stage 2's PSNR gain over opt_v1 on its own (unflagged) train tiles vs on the scored tiles, in dB.

    Stage 3 trains on the opt_v2 Stage 2 wrote for the tiles Stage 2 itself was fitted on; a positive gap is how much
    better that input is than what unseen tiles get at inference (``{}`` when the catalog has no train tiles).
    """
    import torch

    index = keep_unflagged(catalog.index, exclude)
    train = index[index["split"] == "train"]
    train = train[train["patch_id"].isin(caches[S.STAGE1].store.index["patch_id"])
                  & train["patch_id"].isin(caches[S.STAGE2].store.index["patch_id"])]  # fmt: skip
    if train.empty:
        return {}
    v1, v2 = (caches[s].store.rows_for(train["patch_id"]) for s in (S.STAGE1, S.STAGE2))
    gains = []
    for start in range(0, len(train), batch_size):
        end = start + batch_size
        truth = metrics.to_reflectance(torch.from_numpy(catalog.read("s2", train.iloc[start:end]).astype(np.float32)))
        p1, p2 = (metrics.to_reflectance(torch.from_numpy(caches[s].store.read("opt", rows.iloc[start:end])
                                                          .astype(np.float32)))
                  for s, rows in ((S.STAGE1, v1), (S.STAGE2, v2)))  # fmt: skip
        gains.append(metrics.psnr(p2, truth) - metrics.psnr(p1, truth))
    scored = per_tile.set_index(["row", "patch_id"])["psnr"]
    gain_scored = float((scored["stage1+2"] - scored[S.STAGE1]).mean())
    gain_train = float(torch.cat(gains).mean())
    return {"stage2_gain_train_db": gain_train, "stage2_gain_scored_db": gain_scored,
            "gap_db": gain_train - gain_scored, "train_tiles": len(train)}  # fmt: skip


def _fit_baseline(cfg: Params, catalog: ShardStore):
    """The ridge baseline, or ``None`` (with a warning) when the catalog has no train tiles."""

    t0 = time.perf_counter()
    try:
        model = fit_baseline(catalog, "train", ridge=cfg.evaluate.baseline_ridge,
                             max_tiles=cfg.evaluate.baseline_max_tiles, batch_size=cfg.evaluate.batch_size)  # fmt: skip
    except GacError as e:
        print(f"warning: no baseline row: {e}", file=sys.stderr)
        return None, 0.0
    return model, time.perf_counter() - t0


def evaluate(
    cfg: Params,
    out_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    attention_maps: AttentionMaps | None = None,
    verbose: bool = True,
    baseline_catalog: str | Path | None = None,
    run_detail: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Score every ablation row on ``cfg.evaluate.split``; write, log and tag everything (see the module docstring).

    Args:
        cfg: All parameters (catalog, the three caches, ``evaluate``, ``mlflow``, ``data.source``).
        out_dir: Folder of plots, figures and GeoTIFFs (default ``cfg.evaluate.out``); replaced as a whole.
        metrics_path: The JSON for ``dvc metrics show``: :func:`headline` of the result (default:
            ``<out_dir>.metrics.json``, :func:`~gac.pipeline.metrics_beside`; the DVC stage passes
            ``metrics/evaluate.json``).
        attention_maps: Optional hook ``(s1_db (B, 2, H, W), opt_v2_dn (B, 12, H, W)) -> (B, h, w)``; when given,
            an attention picture is saved per visualised tile.
        verbose: Print the ablation table and the tile counts.
        baseline_catalog: Catalog whose train split the baseline is fitted on (default: ``cfg.catalog.out``).
        run_detail: What the MLflow run's name says besides the stage and revision (:func:`gac.io.tracking.run_name`;
            ``gac evaluate --data-dir`` names the root and split).
        run_tags: More tags of the MLflow run.

    Returns:
        The content of ``<out_dir>/details.json``: ``{row: {metric: value}}``, ``groups``, ``leakage`` and
        ``provenance``.
    """
    import mlflow

    p = cfg.evaluate
    out = Path(out_dir or p.out)
    metrics_path = metrics_path or metrics_beside(out)
    catalog = ShardStore(cfg.catalog.out)
    caches = open_caches(cfg)
    rows, missing, excluded = common_tiles(catalog, caches, p.split, cfg.data.exclude)
    fit_catalog = ShardStore(baseline_catalog) if baseline_catalog is not None else catalog
    baseline, fit_seconds = _fit_baseline(cfg, fit_catalog)
    lpips_fn = None
    if p.lpips_weights_path or p.lpips_backbone_path:
        lpips_fn = lpips_metric(p.lpips_weights_path, p.lpips_backbone_path)
    per_tile, baseline_spt, calibration = score(rows, catalog, caches, baseline, p.batch_size, lpips_fn)
    metric_names = [*METRICS, *(["lpips"] if lpips_fn is not None else [])]
    table = summarise(per_tile, metric_names)
    for row, figures in calibration_table(per_tile, calibration).items():
        table[row] |= figures
    shown_names = [*metric_names, *(FIGURES if calibration else ())]
    for row, stage in ROWS.items():
        if row in table:
            seconds = {"baseline": baseline_spt, "truth": None}.get(row)
            table[row]["seconds_per_tile"] = caches[stage].provenance.get("seconds_per_tile") if stage else seconds
    groups = group_tables(per_tile, metric_names)
    split_tiles = int((catalog.index["split"] == p.split).sum())
    rejected = rejected_in(catalog.rejected(), [p.split])  # tiles of the split the catalog could not use
    stages = {stage: {**c.provenance, "cache": str(c.store.root)} for stage, c in caches.items()}
    if baseline is not None:
        stages["baseline"] = {"weights_origin": f"ridge regression fitted on {baseline.tiles} catalog train tiles",
                              "fit_seconds": round(fit_seconds, 3), "ridge": baseline.ridge,
                              "catalog": str(fit_catalog.root)}  # fmt: skip
    provenance = {"split": p.split, "data_source": cfg.data.source, "catalog": str(catalog.root),
                  "tiles_in_split": split_tiles, "tiles_rejected": rejected, "tiles_evaluated": len(rows),
                  "missing": missing, "excluded": excluded, "stages": stages}  # fmt: skip
    leakage = leakage_gap(catalog, caches, per_tile, cfg.data.exclude, p.batch_size)

    with atomic_path(out) as tmp:
        tmp.mkdir()
        _write_csvs(tmp, table, groups, per_tile)
        visualise(tmp, rows.head(p.n_visualize), catalog, caches, per_tile, attention_maps)
        if baseline is not None:
            np.savez(tmp / "baseline.npz", **baseline.state())
    text = format_table(table, shown_names)
    if verbose:
        lacking = ", ".join(f"{k} {v}" for k, v in missing.items() if v) or "none"
        flags = ", ".join(f"{k} {v}" for k, v in excluded.items()) or "no filter"
        said = "".join(f"{note}; " for note in [rejected_note(rejected, catalog.root)] if note)
        print(f"Evaluated {len(rows)} of {split_tiles + rejected} '{p.split}' tiles ({said}missing from caches: "
              f"{lacking}; excluded by data.exclude: {flags})")  # fmt: skip
        print(text)
        if leakage:
            print(f"Stage 2 gain over opt_v1: {leakage['stage2_gain_train_db']:+.2f} dB on the train tiles it was "
                  f"fitted on, {leakage['stage2_gain_scored_db']:+.2f} dB on these (gap {leakage['gap_db']:+.2f} dB: "
                  f"what Stage 3's training input overstates)")  # fmt: skip

    tags = {"gac.split": p.split, "gac.data_source": cfg.data.source, **(run_tags or {})}
    with tracking.start_run(cfg.mlflow, "evaluate", tags=tags, detail=run_detail) as run:
        mlflow.log_params({"split": p.split, "data_source": cfg.data.source, "tiles": len(rows),
                           "n_visualize": p.n_visualize, "baseline_ridge": p.baseline_ridge})  # fmt: skip
        tracking.log_datasets({"catalog": catalog.root, **{LABELS[stage]: c.store.root for stage, c in caches.items()}},
                              "evaluation")  # fmt: skip
        mlflow.log_metrics({metric_key(r, m): float(v) for r, vals in table.items() for m, v in vals.items()
                            if v is not None and math.isfinite(v)})  # fmt: skip
        provenance["mlflow_run_id"] = run.info.run_id
        result = _finite({**table, "groups": groups, "leakage": leakage, "provenance": provenance})
        write_text(out / DETAILS, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        write_text(metrics_path, json.dumps(headline(result), indent=2, sort_keys=True) + "\n")
        mlflow.log_artifacts(str(out), artifact_path="evaluate")
        mlflow.log_artifact(str(metrics_path))
        mlflow.log_text(text + "\n", "ablation.txt")
    return result
