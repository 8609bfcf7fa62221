"""The MLflow model of a trained stage, logged as *code* (MLflow's models-from-code), not as a pickle.

MLflow copies this file beside ``weights.safetensors`` and ``params.json``; loading runs it, which rebuilds the network
with :func:`gac.training.export.load_model`. Nothing is unpickled, so a registry model is as safe to load as a
``weights_only`` checkpoint. Input: ``{"s1": (N, 2, 120, 120) dB, "opt": (N, 12, 120, 120) reflectance}`` (float32;
Stage 2 ignores ``s1``); output: the refined optical, (N, 12, 120, 120) reflectance.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model


class StageModel(mlflow.pyfunc.PythonModel):
    """A GAC stage behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from pathlib import Path

        from gac.training.export import load_model

        self.stage, self.section, self.model = load_model(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params=None):  # no type hints: the signature comes from log_model
        import torch

        from gac.training.export import apply

        s1 = torch.as_tensor(np.asarray(model_input["s1"], dtype=np.float32))
        opt = torch.as_tensor(np.asarray(model_input["opt"], dtype=np.float32))
        with torch.inference_mode():
            return apply(self.stage, self.model, s1, opt).float().numpy()


set_model(StageModel())
