"""Stage 3 task: TerraMind with cross-attention LoRA grounds opt_v2 in the SAR → opt_v3.

Losses: reconstruction (L1 to the real S2), SAR-edge agreement (:func:`gac.evaluation.metrics.sar_edge_agreement`, the
same
function the evaluation reports and the promotion gate checks) and cycle consistency — the grounder's own S2→S1 path
must give back the SAR the tile came from (L1 in dB / 10). The best checkpoint, and early stopping, follow
:func:`gac.training.task.selection_score` (fidelity and SAR consistency together).
"""

from __future__ import annotations

import torch

from gac.config import Stage3Params
from gac.evaluation import metrics
from gac.models.grounding import build_grounder
from gac.training.task import RefineTask

#: dB errors are divided by this so the cycle term is on the scale of reflectance errors.
DB_SCALE = 10.0


class Stage3Task(RefineTask):
    def configure_models(self, device: torch.device) -> None:
        self.params = Stage3Params.model_validate(self.section)
        self.model = build_grounder(self.params)

    def predict(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.distribution(batch["s1"], batch["source"])

    def losses(self, pred: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        p = self.params
        terms = {"recon": p.recon_weight * torch.nn.functional.l1_loss(pred, batch["target"])}
        if p.sar_edge_weight > 0:
            edge = metrics.sar_edge_agreement(pred.float(), batch["target"], batch["s1"], reduction="mean")
            terms["sar_edge"] = p.sar_edge_weight * edge
        if p.cycle_weight > 0:
            sar = self.model.sar_from_optical(pred)
            terms["cycle"] = p.cycle_weight * torch.nn.functional.l1_loss(sar, batch["s1"]) / DB_SCALE
        return terms
