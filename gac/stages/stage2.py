"""Stage 2: Prithvi-EO + LoRA refines opt_v1 into opt_v2 (the task: :mod:`gac.training.stage2`)."""

from __future__ import annotations

from gac.config import Params, Stage2Params
from gac.pipeline import StageName
from gac.stages import trained
from gac.stages.trained import TrainOptions

NAME = StageName.STAGE2


def run(cfg: Params, section: Stage2Params, opt_v1: str, opt_v2: str, options: TrainOptions) -> dict:
    """Train on ``opt_v1`` (default ``stage1.out``), write ``opt_v2``; returns the DVC metrics summary."""
    return trained.run(NAME, cfg, section, opt_v1, opt_v2, options)
