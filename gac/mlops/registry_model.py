"""The MLflow model of a trained stage, logged as *code* (MLflow's models-from-code), not as a pickle.

MLflow copies this file beside ``weights.safetensors`` and ``params.json``, and the GAC modules it reaches as
``code/gac`` (:func:`gac.mlops.registry.model_code`), which loading puts first on ``sys.path``; loading runs this file,
which rebuilds the network with :func:`gac.training.export.load_model`. Nothing is unpickled, so a registry model is as
safe to load as a ``weights_only`` checkpoint, and it needs no GAC install. Input: ``{"s1": (N, 2, 120, 120) dB,
"opt": (N, 12, 120, 120) reflectance in [0, 1]}`` (float32; Stage 2 ignores ``s1``); output: the refined optical,
(N, 12, 120, 120) reflectance in [0, 1] — or, for a model trained with a σ head, ``{"opt": that, "sigma": its
calibrated per-pixel, per-band σ (reflectance)}``, as the logged signature says
(:func:`gac.training.export.pyfunc_output`).

In a process that has imported ``gac`` already (``gac infer``), Python keeps that package: the model then runs the
imported code, and :meth:`StageModel.load_context` warns if it differs from the code the model shipped with.
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

        folder = Path(context.artifacts["model"])  # <model>/artifacts/model; the shipped code is <model>/code/gac
        self.stage, self.section, self.model = load_model(folder)
        _warn_if_other_code(folder.parents[1] / "code" / "gac")

    def predict(self, context, model_input, params=None):  # no type hints: the signature comes from log_model
        import torch

        from gac.training.export import pyfunc_output

        s1 = torch.as_tensor(np.asarray(model_input["s1"], dtype=np.float32))
        opt = torch.as_tensor(np.asarray(model_input["opt"], dtype=np.float32))
        return pyfunc_output(self.stage, self.model, s1, opt)


def _warn_if_other_code(shipped) -> None:
    """Warn when the ``gac`` that runs is not the code ``shipped`` with the model and differs from it.

    Why: the version's digest and card describe the shipped code; a silent mismatch would make its results
    irreproducible.
    """
    import warnings
    from pathlib import Path

    import gac

    here = Path(gac.__file__).resolve().parent
    if not shipped.is_dir() or here == shipped.resolve():
        return

    def same(path: Path) -> bool:
        mine = here / path.relative_to(shipped)
        return mine.is_file() and mine.read_bytes() == path.read_bytes()

    differ = sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*.py") if not same(p))
    if differ:
        warnings.warn(
            f"the gac imported here ({here}) differs from the code this model was registered with in "
            f"{', '.join(differ)}; the imported code runs (load the model in a process without gac to run its own)",
            stacklevel=2,
        )


set_model(StageModel())
