"""The promote stage: gated promotion of a consistent Stage 2 + Stage 3 pair (:mod:`gac.mlops.promote`), and the
decision per model as DVC metrics."""

from __future__ import annotations

from collections.abc import Sequence

from gac.config import Params
from gac.io.atomic import write_json
from gac.mlops.promote import promote_models

#: What ``metrics/promote.json`` holds per model (``dvc metrics show`` prints one column per key of every metrics file);
#: the checks with their numbers are printed and logged to the MLflow run as ``promote.json``.
HEADLINE = ("candidate", "champion_before", "champion_after", "promoted")


def run(cfg: Params, metrics: str | None, models: Sequence[str] | None = None, version: str | None = None) -> list:
    """Decide on ``models`` (default: every registered stage's) and write the decisions to ``metrics`` (``None``: no
    file; the decisions are printed and logged to the promote run either way)."""

    def record(decisions) -> None:  # in the promote run, before it counts as recorded (see promote_models)
        write_json(metrics, {d.model: {k: d.to_dict()[k] for k in HEADLINE} for d in decisions})

    decisions = list(promote_models(cfg, models, version, record=record if metrics else None))
    for decision in decisions:
        print("\n".join(decision.lines()))
    return decisions
