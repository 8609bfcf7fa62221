"""Stage 2 task: Prithvi-EO + LoRA refines opt_v1 → opt_v2 with L1 + MS-SSIM (+ LPIPS) against the real S2.

The best checkpoint is the one with the lowest validation :func:`gac.training.task.selection_score`.
"""

from __future__ import annotations

import torch

from gac.config import Stage2Params
from gac.evaluation import metrics
from gac.models.prithvi import build_refiner
from gac.training.task import RefineTask


class Stage2Task(RefineTask):
    def configure_models(self, device: torch.device) -> None:
        self.params = Stage2Params.model_validate(self.section)
        self.model = build_refiner(self.params, device=device)
        self.lpips = None
        if self.params.lpips_weight > 0:  # fails with one clear line when no local LPIPS weights are configured
            self.lpips = metrics.lpips_metric(self.params.lpips_weights_path)

    def predict(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.distribution(batch["source"])

    def losses(self, pred: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        p, target = self.params, batch["target"]
        terms = {"l1": p.l1_weight * torch.nn.functional.l1_loss(pred, target)}
        if p.ms_ssim_weight > 0:
            terms["ms_ssim"] = p.ms_ssim_weight * (1 - metrics.ms_ssim(pred.float(), target.float())).mean()
        if self.lpips is not None:
            self.lpips.to(pred.device)
            terms["lpips"] = (
                p.lpips_weight * self.lpips(pred.float() * metrics.DN_SCALE, target.float() * metrics.DN_SCALE).mean()
            )
        return terms
