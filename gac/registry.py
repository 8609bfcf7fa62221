"""The MLflow model registry: log a trained stage, register it as ``gac-stage2``/``gac-stage3`` ``@challenger``.

Promotion to ``champion`` is gated (see :mod:`gac.promote`); registration only ever moves ``challenger``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAMES = {"stage2": "gac-stage2", "stage3": "gac-stage3"}
CHALLENGER = "challenger"
CHAMPION = "champion"


def pip_requirements() -> list[str]:
    """The pinned packages a registry model needs (given, so MLflow does not spend seconds inferring them)."""
    from importlib.metadata import version

    names = ["torch", "terratorch", "peft", "bitsandbytes", "safetensors", "numpy", "mlflow"]
    return [f"{n}=={version(n)}" for n in names] + ["gac"]


def example_input(n: int = 1) -> dict[str, np.ndarray]:
    """A valid input (for the signature): SAR at -12 dB and a grey 0.1 reflectance optical tile."""
    return {"s1": np.full((n, 2, 120, 120), -12.0, np.float32), "opt": np.full((n, 12, 120, 120), 0.1, np.float32)}


def log_and_register(
    model_dir: str,
    section: Any,
    metrics: dict[str, float],
    trainable: dict | None = None,
    register: bool = True,
    tags: dict | None = None,
) -> str | None:
    """Log a stage's model folder as an MLflow model in the active run and register it ``@challenger``."""
    import mlflow
    from mlflow.models import infer_signature

    from gac import registry_model, tracking
    from gac.promote import describe_version, model_card
    from gac.training.export import apply, load_model

    stage, _, model = load_model(model_dir)
    x = example_input(2)
    import torch

    with torch.inference_mode():
        y = apply(stage, model, torch.from_numpy(x["s1"]), torch.from_numpy(x["opt"])).numpy()
    name = MODEL_NAMES[stage]
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=Path(registry_model.__file__),
        artifacts={"model": model_dir},
        signature=infer_signature(x, y),
        input_example=example_input(1),
        pip_requirements=pip_requirements(),
        registered_model_name=name if register else None,
    )
    if not register:
        return None
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    origin = tracking.weights_origin(getattr(section, "pretrained", False), getattr(section, "ckpt_path", None))
    card = model_card(
        {
            "name": name,
            "version": version,
            "stage": stage,
            "run_id": mlflow.active_run().info.run_id,
            "weights_origin": origin,
            "data": (tags or {}).get("gac.data", "unknown"),
            "params": section.model_dump(),
            "metrics": metrics,
            "trainable": trainable or {},
            "git_commit": tracking.git_commit(),
        }
    )
    describe_version(client, name, version, card)
    for key, value in {"weights_origin": origin, "stage": stage, **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version
