"""The trained stages by name: how each is built, trained, saved and reloaded.

GAC trains two stages of the same shape (a frozen foundation model + LoRA + a zero-initialised head, refining an optical
image): Stage 2 (Prithvi-EO, :mod:`gac.models.prithvi`) and Stage 3 (TerraMind, :mod:`gac.models.grounding`). Code
that handles "a trained stage" — the Lightning fit, the model folder, the registry model — looks the stage up here
instead of branching on its name. Modules are named by string and imported on first use, so this table costs nothing
to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gac.config import Stage2Params, Stage3Params
from gac.pipeline import StageName as S


@dataclass(frozen=True)
class TrainedStage:
    """One trained stage: its params type, Lightning task, and the builder module's state/load functions."""

    params: type
    task_path: str
    builder_module: str
    state_fn: str
    load_fn: str

    @property
    def task(self) -> type:
        module, name = self.task_path.rsplit(".", 1)
        return getattr(__import__(module, fromlist=[name]), name)

    def _fn(self, name: str):
        return getattr(__import__(self.builder_module, fromlist=[name]), name)

    def state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self._fn(self.state_fn)(model)

    def load(self, section: Any, state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> torch.nn.Module:
        return self._fn(self.load_fn)(section, state, device)

    def report(self, model: torch.nn.Module) -> dict:
        return self._fn("trainable_report")(model)


TRAINED_STAGES: dict[str, TrainedStage] = {
    S.STAGE2: TrainedStage(
        Stage2Params, "gac.training.stage2.Stage2Task", "gac.models.prithvi", "refiner_state", "load_refiner"
    ),
    S.STAGE3: TrainedStage(
        Stage3Params, "gac.training.stage3.Stage3Task", "gac.models.grounding", "grounder_state", "load_grounder"
    ),
}
