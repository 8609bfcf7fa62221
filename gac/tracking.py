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


@contextlib.contextmanager
def start_run(params: MlflowParams, run_name: str, tags: dict[str, Any] | None = None, **kwargs: Any) -> Iterator:
    """Start (or nest) an MLflow run on the project store, tagged with the git commit and the DVC stage."""
    import mlflow

    setup(params)
    all_tags = {"gac.git_commit": git_commit(), "gac.dvc_stage": os.environ.get("DVC_STAGE", run_name)}
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    with mlflow.start_run(run_name=run_name, tags=all_tags, **kwargs) as run:
        yield run


def weights_origin(pretrained: bool, ckpt_path: str | None) -> str:
    """Where a model's weights came from, for every metrics record and model card."""
    if ckpt_path:
        return f"local checkpoint: {ckpt_path}"
    return "hub (pretrained)" if pretrained else "random init"
