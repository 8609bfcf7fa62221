"""MLflow in one place: the tracking store, experiments and runs every stage logs to.

The embedded store is SQLite plus an artifact folder, both under ``mlruns/`` (MLflow 3's file store is legacy). Stages
call :func:`start_run`; nothing else sets the tracking URI, so the UI command in the README always shows every run.

**A team's server.** ``MLFLOW_TRACKING_URI``, when set, wins over ``mlflow.tracking_uri`` (:func:`uri`), as it does
for every MLflow client; each run records the store it went to (tag ``gac.tracking_uri``, credentials dropped). With
an ``http(s)://`` server, experiments take the server's artifact root, so artifacts go through its proxy
(``mlflow server --artifacts-destination s3://…``: ``mlflow-artifacts:/`` URIs) and nothing is written under the
project; an ``artifact_location`` with a scheme (``s3://bucket/gac``) is kept as given (:func:`artifact_root`).

**A store that can be moved or copied.** The tracking URI ``sqlite:///mlruns/mlflow.db`` is relative to the working
directory (the project root, where DVC runs every stage and the README starts the UI), but MLflow writes the
experiment's artifact location — and from it every run's ``artifact_uri`` and every logged model's location — as an
absolute path (``resolve_uri_if_local`` in its SQL store), so a copied or moved ``mlruns/`` pointed at the old
folder's artifacts. MLflow itself reads a relative location as relative to the working directory (its local artifact
repository and the UI server's artifact endpoints both do), so :func:`setup` stores a relative
``mlflow.artifact_location`` as given, relative, beside the relative database path: copying the project folder keeps
runs, artifacts and registered models loadable. An absolute ``artifact_location`` is stored absolute, as asked.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gac.config import MlflowParams
from gac.io.lock import exclusive
from gac.io.store import ShardStore

#: Seconds a process waits for another to finish creating (migrating) the same SQLite store.
STORE_LOCK_WAIT_S = 300.0


def uri(params: MlflowParams) -> str:
    """The tracking store runs go to: ``MLFLOW_TRACKING_URI`` when set (how every MLflow user reaches a team's server),
    else ``mlflow.tracking_uri`` (the embedded SQLite store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri


def use(tracking_uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect on ``MLFLOW_TRACKING_URI``.

    MLflow also exports the URI it is given to the environment (for subprocesses); GAC keeps that variable for what a
    user set (:func:`uri` gives it precedence), so a process that opens two stores, one after the other, or a child
    process with params of its own, is not sent to the first store by GAC's own earlier call.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def safe_uri(tracking_uri: str) -> str:
    """``tracking_uri`` without credentials (``user:secret@`` dropped), fit for a tag or a log line."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(tracking_uri)
    if parts.password is None and parts.username is None:
        return tracking_uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _has_scheme(location: str) -> bool:
    """``s3://…``, ``gs://…``, ``mlflow-artifacts:/…``, ``file:///…``: a URI MLflow resolves itself."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", location) is not None


def artifact_root(params: MlflowParams, tracking_uri: str) -> str | None:
    """The artifact location a new experiment is created with.

    * one with a scheme (``s3://bucket/gac``) is kept as given;
    * with a tracking server (``http(s)://``) a plain path means "the server's default": ``None``, so the server
      picks its proxied ``mlflow-artifacts:/`` root (``mlflow server --artifacts-destination …``) and no client needs
      the artifact store's credentials or a shared disk;
    * otherwise the folder, as an absolute ``file:`` URI (see :func:`setup` for the relative SQLite case).
    """
    location = params.artifact_location
    if _has_scheme(location):
        return location
    if tracking_uri.split(":", 1)[0] in ("http", "https", "databricks"):
        return None
    return Path(location).resolve().as_uri()


def setup(params: MlflowParams) -> str:
    """Point MLflow at the tracking store (:func:`uri`) and make sure the experiment exists; return its id.

    Creating a SQLite store migrates its schema; two processes doing that at once (sweep workers, DDP ranks) break
    each other, so for SQLite the first use is serialised with a lock file beside the database. A relative
    ``artifact_location`` of a SQLite store is stored relative (see the module docstring); an experiment created with
    that folder's absolute path is rewritten to the relative one, with its runs, logged models and model versions
    (:func:`_relocate`). Nothing is written under the project for any other store.
    """
    import mlflow

    tracking_uri = uri(params)
    lock = contextlib.nullcontext()
    sqlite = tracking_uri.startswith("sqlite:///")
    if sqlite:
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = exclusive(db, "creating the MLflow store", wait=STORE_LOCK_WAIT_S)
    use(tracking_uri)
    root = artifact_root(params, tracking_uri)
    relative = sqlite and not _has_scheme(params.artifact_location) and not Path(params.artifact_location).is_absolute()
    with lock:
        experiment = mlflow.get_experiment_by_name(params.experiment)
        if experiment is None:
            if root is not None and root.startswith("file:"):
                Path(params.artifact_location).resolve().mkdir(parents=True, exist_ok=True)
            experiment = _create_experiment(params.experiment, root)
        if relative and experiment.artifact_location == root:
            relative_to = Path(params.artifact_location).as_posix()
            _relocate(tracking_uri, experiment.experiment_id, experiment.artifact_location, relative_to)
    return mlflow.set_experiment(params.experiment).experiment_id


def _create_experiment(name: str, artifact_location: str | None):
    """Create experiment ``name``, or return the one another process created first.

    On a shared tracking server nothing serialises two hosts' first runs (the SQLite lock of :func:`setup` is a
    local file): both find no experiment, both create it, and the server answers the second with
    ``RESOURCE_ALREADY_EXISTS`` (its unique name). That host then uses the experiment the first one made.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_experiment(mlflow.create_experiment(name, artifact_location=artifact_location))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name)


#: The columns :func:`_relocate` rewrites: (table, column, whether the table has an ``experiment_id``).
RELOCATED_COLUMNS = (
    ("experiments", "artifact_location", True),
    ("runs", "artifact_uri", True),
    ("logged_models", "artifact_location", True),
    ("model_versions", "storage_location", False),
)
#: The MLflow schema (alembic revision) :func:`_relocate` was written against; on another it refuses, and
#: ``tests/test_tracking.py`` fails on a fresh store of the installed MLflow, so a new MLflow is checked first.
RELOCATED_SCHEMA = "dc11669786a5"


def _relocate(tracking_uri: str, experiment_id: str, old: str, new: str) -> None:
    """Replace the location prefix ``old`` by ``new`` in the experiment, its runs, its logged models and the model
    versions stored under it (SQLite stores only).

    MLflow has no API to change an artifact location (it is fixed when the experiment is made, and its SQL store
    makes a relative one absolute), so this is four SQL updates on MLflow's own tables, in one transaction; only
    values that start with ``old`` change. It depends on MLflow's private schema, hence :data:`RELOCATED_SCHEMA`: on a
    store of another revision the location stays absolute (a moved copy then needs the old path) and one line says so.
    """
    import sqlalchemy

    engine = sqlalchemy.create_engine(tracking_uri)
    try:
        with engine.begin() as db:
            revision = db.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
            if revision != RELOCATED_SCHEMA:
                print(f"mlflow: {tracking_uri}: schema {revision}, not {RELOCATED_SCHEMA}: the artifact location "
                      f"stays {old} (absolute) until GAC's relocation is checked against this MLflow")  # fmt: skip
                return
            for table, column, by_experiment in RELOCATED_COLUMNS:
                where = f"substr({column}, 1, :n) = :old" + (" AND experiment_id = :id" if by_experiment else "")
                db.execute(
                    sqlalchemy.text(f"UPDATE {table} SET {column} = :new || substr({column}, :n + 1) WHERE {where}"),
                    {"new": new, "old": old, "n": len(old), "id": int(experiment_id)},
                )
    finally:
        engine.dispose()


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


def run_name(stage: str, detail: str | None = None) -> str:
    """A run name a person can tell apart in the MLflow UI: stage, what it is within the stage, DVC experiment and git
    revision.

    e.g. ``stage2 · exp bushy-ruin @ 6f4a854`` under ``dvc exp run``, ``stage2 · workspace @ 6f4a854`` otherwise, and
    ``stage2 · trial 3 · exp bushy-ruin @ 6f4a854`` for a sweep trial (``detail="trial 3"``).
    """
    exp = dvc_experiment()
    where = WORKSPACE if exp == WORKSPACE else f"exp {exp}"
    return " · ".join(p for p in (stage, detail, f"{where} @ {git_commit()[:7]}") if p)


def run_tags(stage: str) -> dict[str, str]:
    """Tags every GAC run carries: stage, git commit, DVC stage, DVC experiment (and its baseline revision), and the
    tracking store it was written to (:func:`safe_uri`: a run copied between stores still says where it was made)."""
    import mlflow

    tags = {
        "gac.stage": stage,
        "gac.tracking_uri": safe_uri(mlflow.get_tracking_uri()),
        "gac.git_commit": git_commit(),
        "gac.dvc_stage": os.environ.get("DVC_STAGE", stage),
        "gac.dvc_experiment": dvc_experiment(),
    }
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["gac.dvc_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


@contextlib.contextmanager
def start_run(
    params: MlflowParams, stage: str, tags: dict[str, Any] | None = None, detail: str | None = None, **kwargs: Any
) -> Iterator:
    """Start (or nest) an MLflow run on the project store, named and tagged by :func:`run_name`/:func:`run_tags`.

    The run is tagged with the process that owns it (:data:`OWNER_TAGS`), and runs of the same ``stage`` that a
    killed process of this machine left RUNNING are first closed as KILLED (:func:`close_stale_runs`).
    """
    import mlflow

    experiment_id = setup(params)
    all_tags = run_tags(stage) | {k: str(v) for k, v in (tags or {}).items()}
    if stage not in SHARED_RUNS:
        close_stale_runs(experiment_id, all_tags["gac.stage"])
        all_tags |= dict(zip(OWNER_TAGS, process_owner(os.getpid()), strict=True))
    with mlflow.start_run(run_name=run_name(stage, detail), tags=all_tags, **kwargs) as run:
        yield run


#: Run tags naming the process that owns a run: host name, process id, the process's start (so a reused id is not
#: taken for it).
OWNER_TAGS = ("gac.host", "gac.pid", "gac.pid_start")
#: Stages whose runs other processes reopen (every worker of a sweep logs to its parent run): their owner is unknown.
SHARED_RUNS = frozenset({"sweep"})


def process_owner(pid: int) -> tuple[str, str, str]:
    """``(host, pid, start)`` of a process of this machine; start is the kernel's start time of the process (ticks
    since boot, from ``/proc``), empty where there is no ``/proc``."""
    import socket

    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = ""
    return socket.gethostname(), str(pid), start


def process_alive(pid: str, start: str) -> bool:
    """Whether the process ``pid`` of this machine that started at ``start`` (:func:`process_owner`) still runs."""
    if not pid.isdigit():
        return True  # not ours to judge
    if start:
        return process_owner(int(pid))[2] == start
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_stale_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED each run of ``stage`` still RUNNING whose owner (:data:`OWNER_TAGS`) was a process of this machine
    that no longer runs, print one line each and return their ids.

    Why: a process killed inside ``with mlflow.start_run()`` never ends its run, which then shows as running for good
    (the UI, ``gac promote``'s history). Only runs this machine can judge are closed: a run of another host, or one
    without owner tags (an earlier GAC's, a sweep's), is left as it is.
    """
    import socket

    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    found = client.search_runs(
        [experiment_id],
        f"attributes.status = 'RUNNING' and tags.`gac.stage` = '{stage}' and tags.`gac.host` = '{host}'",
    )
    closed = []
    for run in found:
        pid, start = (run.data.tags.get(key, "") for key in OWNER_TAGS[1:])
        if not process_alive(pid, start):
            client.set_terminated(run.info.run_id, status="KILLED")
            print(f"{stage}: run {run.info.run_id} ({run.info.run_name}) was left RUNNING by process {pid}, which "
                  f"is gone: marked KILLED")  # fmt: skip
            closed.append(run.info.run_id)
    return closed


def run_url(params: MlflowParams, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI at ``mlflow.ui_url`` (the README's ``mlflow ui`` command serves it)."""
    return f"{params.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


#: Digest characters an MLflow dataset keeps (its limit is 36); the whole sha256 is an input tag.
DATASET_DIGEST_CHARS = 16


def log_datasets(stores: dict[str, str | Path], context: str) -> None:
    """Log each GAC store as a dataset input of the active run, so the run's "Datasets" name what it read.

    ``stores`` maps a dataset name (``catalog``, ``opt_v1``, …) to a store folder. Each becomes an MLflow
    ``MetaDataset`` (the tiles stay where they are): its digest is the store's content digest
    (:meth:`gac.io.store.ShardStore.content_digest`, the identity training fingerprints use, independent of the folder),
    its source the folder as given (relative in the project, so it survives a copy), and the input's tags hold
    ``context`` (``training``/``evaluation``), the whole sha256 and the number of tiles per split.
    """
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    datasets, tags_list = [], []
    for name, root in stores.items():
        store = ShardStore(root)
        digest = store.content_digest()
        with warnings.catch_warnings():  # MLflow registers local paths twice (with and without file://) and says so
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(root))
        datasets.append(MetaDataset(source, name=name, digest=digest[:DATASET_DIGEST_CHARS]))
        index = store.index
        counts = index["split"].value_counts() if "split" in index else {}
        tags = {"gac.content_sha256": digest, "tiles": str(len(index))}
        tags |= {f"tiles.{split}": str(int(n)) for split, n in sorted(dict(counts).items())}
        tags_list.append(tags)
    mlflow.log_inputs(datasets=datasets, contexts=[context] * len(datasets), tags_list=tags_list)


#: The values of :func:`weights_origin` (a local file's is this prefix, a space and its path).
RANDOM_INIT, HUB, LOCAL_CHECKPOINT = "random init", "hub (pretrained)", "local checkpoint:"


def weights_origin(pretrained: bool, ckpt_path: str | None) -> str:
    """Where a model's weights came from, for every metrics record, model card and figure title."""
    if ckpt_path:
        return f"{LOCAL_CHECKPOINT} {ckpt_path}"
    return HUB if pretrained else RANDOM_INIT
