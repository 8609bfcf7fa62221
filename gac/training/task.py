"""The Lightning task both trained stages share, in torchgeo's ``BaseTask`` shape.

A stage fills in three hooks — :meth:`RefineTask.configure_models` (the network, built on a given device),
:meth:`RefineTask.predict` (batch → refined optical and, with a σ head, its log-variance) and
:meth:`RefineTask.losses` (named loss terms) — and sets ``monitor``/``mode``; the loop, validation metrics, the
Gaussian NLL of the σ head (:func:`nll_term`), optimiser and schedule live here once. Only trainable parameters
(LoRA adapters and heads) reach the optimiser, so the frozen base costs no optimiser state.

The network is built in Lightning's ``configure_model`` hook, not in ``__init__``: by then the trainer knows the device
it runs on, and an int8 base (bitsandbytes) must be quantised *on* that device — bitsandbytes cannot move already
quantised weights (their ``SCB`` scales stay behind). Outside a trainer, :meth:`RefineTask.build` builds it on a
device of the caller's choosing (e.g. to load a checkpoint into a fresh model).

Debugging/audit aid: with ``GAC_SEEN_TILES_DIR`` set, every training step appends one ``<epoch>\t<step>\t<patch_id>``
line per tile to ``<dir>/rank<global_rank>.txt``, so which tiles each (DDP) rank trained on, and when, can be checked
from the outside (the tests do). Unset, nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gac.evaluation import metrics

#: Environment variable naming the folder of the per-rank seen-tiles audit files (see the module docstring).
SEEN_TILES_ENV = "GAC_SEEN_TILES_DIR"


def nll_term(mean: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL (torch's ``gaussian_nll_loss``, mean over pixels and bands) of ``target`` under N(mean, e^log_var).

    The mean is detached: the term trains the variance only, so a stage's mean prediction — and what its other losses
    make of it — is the same with and without the σ head. ``eps`` is far below any variance the head can predict
    (:data:`gac.models.heads.LOG_VAR_RANGE`): torch's default 1e-6 would floor σ at 10 DN. The level of σ need not
    be reached in training: :mod:`gac.training.calibration` scales it per band on the validation split. (Profiling
    that per-band scale out of the loss was tried: in the learning world it ranked pixels no better — Spearman with
    the known σ 0.926 vs 0.908 in Stage 2, 0.751 vs 0.853 in Stage 3 — so the plain NLL stays.)
    """
    return torch.nn.functional.gaussian_nll_loss(mean.detach(), target, log_var.exp(), eps=1e-12)


def selection_score(ssim: torch.Tensor, sar_edge: torch.Tensor) -> torch.Tensor:
    """What picks a stage's best checkpoint (lower is better): ``(1 − SSIM) + SAR-edge``, per tile.

    One term alone can be gamed: SAR-edge alone chose checkpoints whose 16 px block pattern wrecked SSIM (0.51 →
    0.32), and fidelity alone cannot see whether the radar's boundaries are drawn. Both terms are bounded in
    ``[0, 1]`` with 0 = the real image, so they add without an arbitrary scale (PSNR, in dB, would need one), and the
    real tile scores exactly 0. The same score serves Stage 2 and Stage 3 so their selections mean the same thing.
    """
    return (1.0 - ssim) + sar_edge


class RefineTask(L.LightningModule):
    """Base of the Stage 2 and Stage 3 tasks."""

    #: Validation metric that chooses the best checkpoint and drives early stopping: :func:`selection_score`.
    monitor = "val/selection"
    mode = "min"

    def __init__(self, section: dict[str, Any]) -> None:
        super().__init__()
        # logger=False: the fit logs the section once, flat (MLflow params are immutable: a continued run keeps them)
        self.save_hyperparameters({"section": section}, logger=False)
        self.section = section
        self.train_cfg = section["train"]
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        """Lightning hook: build the network on the device the trainer runs on (once)."""
        if self.model is None:
            device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            self.build(device)

    def build(self, device: str | torch.device = "cpu") -> RefineTask:
        """Build the network on ``device`` now (a no-op if it is built); returns ``self``."""
        if self.model is None:
            self.configure_models(torch.device(device))
        return self

    # -- hooks -------------------------------------------------------------------------------------------------------
    def configure_models(self, device: torch.device) -> None:
        """Build ``self.model``; parameters that must be created on the target device (int8) go to ``device``."""
        raise NotImplementedError

    def predict(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refined optical reflectance (B, 12, 120, 120) for a batch, and its log-variance (``None``: no σ head)."""
        raise NotImplementedError

    def losses(self, pred: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Named, already weighted loss terms; their sum is optimised."""
        raise NotImplementedError

    # -- loop --------------------------------------------------------------------------------------------------------
    def _step(self, batch: dict, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        pred, log_var = self.predict(batch)
        terms = self.losses(pred, batch)
        if log_var is not None:
            terms["nll"] = self.params.nll_weight * nll_term(pred, log_var, batch["target"])
        loss = torch.stack(list(terms.values())).sum()
        bs = len(batch["patch_id"])
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            batch_size=bs,
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=True,
            sync_dist=not on_step,
        )
        for name, value in terms.items():
            self.log(
                f"{stage}/loss_{name}",
                value,
                batch_size=bs,
                on_step=on_step,
                on_epoch=not on_step,
                sync_dist=not on_step,
            )
        return loss, pred

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._record_seen_tiles(batch)
        return self._step(batch, "train")[0]

    def _record_seen_tiles(self, batch: dict) -> None:
        """Append the batch's tiles to this rank's audit file when ``GAC_SEEN_TILES_DIR`` is set."""
        folder = os.environ.get(SEEN_TILES_ENV)
        if not folder:
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        with (Path(folder) / f"rank{self.global_rank}.txt").open("a") as f:
            f.writelines(f"{self.current_epoch}\t{self.global_step}\t{p}\n" for p in batch["patch_id"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, pred = self._step(batch, "val")
        dn = metrics.DN_SCALE
        values = metrics.per_tile(pred.detach().float() * dn, batch["target"].float() * dn, batch["s1"].float())
        bs = len(batch["patch_id"])
        for name in ("psnr", "ssim", "sam_deg", "sar_edge"):
            self.log(f"val/{name}", values[name].mean(), batch_size=bs, sync_dist=True)
        selection = selection_score(values["ssim"], values["sar_edge"]).mean()
        self.log("val/selection", selection, batch_size=bs, sync_dist=True)

    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.train_cfg["lr"], weight_decay=self.train_cfg["weight_decay"])
        warmup = self.train_cfg["warmup_steps"]
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def schedule(step: int) -> float:
            """Linear warm-up, then cosine decay to 10 % over the run."""
            import math

            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
