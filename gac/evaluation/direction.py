"""Which way each metric points: the one direction table.

Validation (checkpoint ``mode``), sweeps (Optuna ``directions``), the ablation's ranking and promotion gates all read
it, so a metric can never be maximised in one place and minimised in another. Kept apart from
:mod:`gac.evaluation.metrics` so that reading a direction imports no torch.
"""

from __future__ import annotations

import re

#: Metrics where a larger value is better; every other metric (errors, angles, distances) is better when smaller.
#: The one direction table: validation, sweeps (Optuna directions), the ablation's ranking and promotion read it.
#: (The coverages of :mod:`gac.evaluation.uncertainty` are best at their nominal level: see its ``NOMINAL``.)
HIGHER_IS_BETTER = frozenset({"psnr", "ssim", "ms_ssim", "spearman_pixel", "spearman_tile"})


def higher_is_better(metric: str) -> bool:
    """Direction of a metric of this module (the last part of a dotted or slashed name, e.g. ``val/psnr``)."""
    return re.split(r"[./]", metric)[-1] in HIGHER_IS_BETTER


def direction(metric: str) -> str:
    """Optuna's name for the direction of ``metric``: ``maximize`` or ``minimize``."""
    return "maximize" if higher_is_better(metric) else "minimize"
