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
#: Model-version tag: sha256 of what a registry model is made of (its model code and the files of its folder).
CONTENT_TAG = "content_sha256"


def pip_requirements() -> list[str]:
    """The pinned packages a registry model needs (given, so MLflow does not spend seconds inferring them)."""
    from importlib.metadata import version

    names = ["torch", "terratorch", "peft", "bitsandbytes", "safetensors", "numpy", "mlflow"]
    return [f"{n}=={version(n)}" for n in names] + ["gac"]


def content_digest(model_dir: str | Path) -> str:
    """sha256 of the registry model's code and every file of ``model_dir`` (names and bytes), in a fixed order.

    Why: a stage rerun that leaves the model as it was must not pile up identical versions in the registry.
    """
    import hashlib

    from gac import registry_model

    h = hashlib.sha256(Path(registry_model.__file__).read_bytes())
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(path.relative_to(model_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


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
    digest = content_digest(model_dir)
    client = mlflow.MlflowClient()
    same = client.search_model_versions(f"name = '{name}' and tags.{CONTENT_TAG} = '{digest}'") if register else []
    if same:  # this very model is registered already (dvc repro after a code change that left it as it was)
        newest = max(same, key=lambda v: int(v.version))
        version, run_id = str(newest.version), newest.run_id
    else:
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
        version, run_id = str(info.registered_model_version), mlflow.active_run().info.run_id
    client.set_registered_model_alias(name, CHALLENGER, version)
    origin = tracking.weights_origin(getattr(section, "pretrained", False), getattr(section, "ckpt_path", None))
    card = model_card(
        {
            "name": name,
            "version": version,
            "stage": stage,
            "run_id": run_id,
            "weights_origin": origin,
            "data": (tags or {}).get("gac.data", "unknown"),
            "params": section.model_dump(),
            "metrics": metrics,
            "trainable": trainable or {},
            "git_commit": tracking.git_commit(),
        }
    )
    describe_version(client, name, version, card)
    for key, value in {"weights_origin": origin, "stage": stage, CONTENT_TAG: digest, **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version
