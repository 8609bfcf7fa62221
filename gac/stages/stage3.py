"""Stage 3: TerraMind with LoRA on the decoder's cross-attention grounds opt_v2 in the SAR → opt_v3 (the task:
:mod:`gac.training.stage3`)."""

from __future__ import annotations

from gac.config import Params, Stage3Params
from gac.inference.engine import resolve_device
from gac.inference.refine import write_cache
from gac.io.tracking import weights_origin
from gac.pipeline import StageName, output
from gac.stages import trained
from gac.stages.trained import TrainOptions
from gac.training.export import load_model

NAME = StageName.STAGE3


def run(
    cfg: Params, section: Stage3Params, opt_v2: str, opt_v3: str, options: TrainOptions, stage2_model: str | None = None
) -> dict:
    """Train on ``opt_v2``, write ``opt_v3``; returns the DVC metrics summary.

    ``stage2_model``: a Stage 2 model folder whose opt_v2 is (re)written first (into ``<out>/opt_v2_from_checkpoint``)
    and trained on instead of ``opt_v2``.
    """
    if stage2_model:
        stage, stage2, model = load_model(stage2_model, resolve_device(cfg.stage2.cache.device))
        opt_v2 = f"{section.out}/{output(stage)}_from_checkpoint"
        write_cache(stage, model, options.catalog_root or cfg.catalog.out, cfg.stage1.out, opt_v2, stage2.cache,
                    provenance={"model_dir": stage2_model,
                                "weights_origin": weights_origin(stage2.pretrained, stage2.ckpt_path)})  # fmt: skip
    return trained.run(NAME, cfg, section, opt_v2, opt_v3, options)
