"""The sweep stage (``sweeps/dvc.yaml``): the multi-objective Optuna study of :mod:`gac.mlops.sweep`, its summary as
DVC metrics. Start it on several machines with one storage to share a study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gac import config
from gac.config import Params
from gac.io.atomic import write_json
from gac.mlops import sweep


def run(cfg: Params, metrics: str | Path, register: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """Run ``cfg.sweep``'s trials (``max_steps`` optimizer steps each when given); returns the summary written to
    ``metrics``."""
    sw = cfg.sweep
    if max_steps is not None:
        section = getattr(cfg, sw.stage)
        train = config.override(section.train, max_steps=max_steps)
        cfg = cfg.model_copy(update={sw.stage: config.override(section, train=train.model_dump())})
    summary = sweep.run(cfg, register=register)
    write_json(metrics, summary)
    print(
        f"Sweep {sw.study}: {summary['trials']} trials ({summary['complete']} complete, {summary['failed']} failed), "
        f"Pareto front of {summary['pareto']}; best trial {summary.get('best_trial')}: {summary.get('best')}"
    )
    return summary
