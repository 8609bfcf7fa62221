"""Training curves for ``dvc plots``: one small CSV per metric, made from Lightning's ``<out>/logs/metrics.csv``.

Why not plot ``metrics.csv`` itself: Lightning writes one row per logging call, so a row holding the training loss has
blank validation cells and the other way round; ``dvc plots`` draws those blanks as 0 (zig-zags down to the axis), and
a plot of several of its columns puts a loss of ~0.2 and a PSNR of ~19 dB on one axis. The file is also no DVC
output (``artifacts/`` is git-ignored, and ``logs/`` is not declared), so ``dvc plots diff`` between experiments cannot
find it. Here each metric gets its own file (``step`` and one value column, rows without that metric dropped), written
to a git-tracked folder that ``dvc.yaml`` declares as the stage's ``plots`` outputs (``cache: false``, like the
metrics files), each with its title and axes.
"""

from __future__ import annotations

from pathlib import Path

from gac.io.atomic import write_text

#: File stem → (Lightning column, value column in the file). The stem is what ``dvc.yaml`` names; the value column
#: is its ``y``; ``step`` (the optimizer step) is its ``x``.
CURVES: dict[str, tuple[str, str]] = {
    "train_loss": ("train/loss", "loss"),
    "val_loss": ("val/loss", "loss"),
    "val_psnr": ("val/psnr", "psnr"),
    "val_ssim": ("val/ssim", "ssim"),
    "val_sam_deg": ("val/sam_deg", "sam_deg"),
    "val_sar_edge": ("val/sar_edge", "sar_edge"),
    "val_selection": ("val/selection", "selection"),
}


def write_curves(log_csv: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write ``<out_dir>/<stem>.csv`` (columns ``step``, value) for every curve of :data:`CURVES`.

    Every file is written, header-only when the log lacks the metric or does not exist (a training that found
    itself complete logs nothing new): DVC requires each declared output to exist. A step logged twice (a validation
    scored again after a resumed fit) keeps its last value. NaN values are left out with the blanks: a plot cannot
    draw them, and the MLflow run and ``metrics.csv`` keep them.

    Returns:
        Rows written per file stem.
    """
    import pandas as pd

    log_csv, out_dir = Path(log_csv), Path(out_dir)
    log = pd.read_csv(log_csv) if log_csv.is_file() and log_csv.stat().st_size else pd.DataFrame({"step": []})
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for stem, (column, name) in CURVES.items():
        values = log[["step", column]] if column in log else pd.DataFrame({"step": [], column: []})
        values = values.dropna().drop_duplicates("step", keep="last").sort_values("step", kind="stable")
        curve = pd.DataFrame({"step": values["step"].astype(int), name: values[column].astype(float)})
        write_text(out_dir / f"{stem}.csv", curve.to_csv(index=False))
        rows[stem] = len(curve)
    return rows
