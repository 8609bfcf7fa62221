"""MLflow in one place: the tracking store, experiments and runs every stage logs to.

The store is SQLite plus an artifact folder, both under ``mlruns/`` (MLflow 3's file store is legacy). Stages call
:func:`start_run`; nothing else sets the tracking URI, so the UI command in the README always shows every run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gac.config import MlflowParams


def setup(params: MlflowParams) -> str:
    """Point MLflow at the project store and make sure the experiment exists; return its id.

    Creating a SQLite store migrates its schema; two processes doing that at once (sweep workers, DDP ranks) break
    each other, so for SQLite the first use is serialised with a lock file beside the database.
    """
    import mlflow

    lock = contextlib.nullcontext()
    if params.tracking_uri.startswith("sqlite:///"):
        db = Path(params.tracking_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = _file_lock(db.with_name(db.name + ".lock"))
    mlflow.set_tracking_uri(params.tracking_uri)
    with lock:
        experiment = mlflow.get_experiment_by_name(params.experiment)
        if experiment is None:
            location = Path(params.artifact_location).resolve()
            location.mkdir(parents=True, exist_ok=True)
            mlflow.create_experiment(params.experiment, artifact_location=location.as_uri())
    return mlflow.set_experiment(params.experiment).experiment_id


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the duration of the block."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def git_commit() -> str:
    """The commit the code ran at (``unknown`` outside a git checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


#: What a run was made in when no ``dvc exp run`` made it (``dvc repro`` or a direct ``gac`` command).
WORKSPACE = "workspace"


def dvc_experiment() -> str:
    """The DVC experiment this process runs in (``dvc exp run`` sets ``DVC_EXP_NAME``), else ``workspace``."""
    return os.environ.get("DVC_EXP_NAME") or WORKSPACE


def run_name(stage: str) -> str:
    """A run name a person can tell apart in the MLflow UI: stage, DVC experiment and git revision.

    e.g. ``stage2 · exp bushy-ruin @ 6f4a854`` under ``dvc exp run``, ``stage2 · workspace @ 6f4a854`` otherwise.
    """
    exp = dvc_experiment()
    where = WORKSPACE if exp == WORKSPACE else f"exp {exp}"
    return f"{stage} · {where} @ {git_commit()[:7]}"


def run_tags(stage: str) -> dict[str, str]:
    """Tags every GAC run carries: stage, git commit, DVC stage, DVC experiment (and its baseline revision)."""
    tags = {
        "gac.stage": stage,
        "gac.git_commit": git_commit(),
        "gac.dvc_stage": os.environ.get("DVC_STAGE", stage),
        "gac.dvc_experiment": dvc_experiment(),
    }
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["gac.dvc_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


@contextlib.contextmanager
def start_run(params: MlflowParams, stage: str, tags: dict[str, Any] | None = None, **kwargs: Any) -> Iterator:
    """Start (or nest) an MLflow run on the project store, named and tagged by :func:`run_name`/:func:`run_tags`."""
    import mlflow

    setup(params)
    all_tags = run_tags(stage) | {k: str(v) for k, v in (tags or {}).items()}
    with mlflow.start_run(run_name=run_name(stage), tags=all_tags, **kwargs) as run:
        yield run


def weights_origin(pretrained: bool, ckpt_path: str | None) -> str:
    """Where a model's weights came from, for every metrics record and model card."""
    if ckpt_path:
        return f"local checkpoint: {ckpt_path}"
    return "hub (pretrained)" if pretrained else "random init"
