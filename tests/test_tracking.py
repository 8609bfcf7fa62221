"""MLflow surfaces of :mod:`gac.io.tracking` and :mod:`gac.training.run_media`: a store that survives being copied, run
names, dataset inputs and training curves. Real MLflow on SQLite files in temporary folders.

The stage and sweep runs themselves are checked where they are made (``test_training.py``, ``test_sweep.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gac.config import MlflowParams
from gac.io import tracking
from gac.io.store import ShardStore

#: A models-from-code pyfunc model: what the registry holds is loaded without any GAC code.
DOUBLER = """
import mlflow


class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input * 2


mlflow.models.set_model(Doubler())
"""

#: Run in the copy, as a fresh process would be after `cp -r project elsewhere`: the project's relative tracking URI.
LOAD_FROM_COPY = """
import json, sys
import mlflow, pandas as pd

mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
run_id = sys.argv[1]
client = mlflow.MlflowClient()
text = mlflow.artifacts.load_text(f"runs:/{run_id}/notes/hello.txt")
listed = sorted(a.path for a in client.list_artifacts(run_id))
pred = mlflow.pyfunc.load_model("models:/gac-test@challenger").predict(pd.DataFrame({"x": [1.5]}))
print(json.dumps({"text": text, "listed": listed, "pred": pred["x"].tolist()}))
"""


def _store(folder: Path, empty_mlflow_db: Path) -> Path:
    (folder / "mlruns").mkdir(parents=True)
    shutil.copyfile(empty_mlflow_db, folder / "mlruns" / "mlflow.db")
    return folder / "mlruns" / "mlflow.db"


def _params(db: Path) -> MlflowParams:
    # The database by its absolute path: MLflow caches one store per tracking URI in a process, so a relative URI
    # would follow the first test's folder. The artifact location is relative, as in params.yaml.
    return MlflowParams(tracking_uri=f"sqlite:///{db}", artifact_location="mlruns/artifacts", experiment="gac")


def test_a_copied_project_keeps_its_runs_artifacts_and_registered_models(
    tmp_path: Path, empty_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Log an artifact and register a model in folder A, copy A to B, delete A: B's store loads both."""
    import mlflow

    a, b = tmp_path / "A", tmp_path / "B"
    params = _params(_store(a, empty_mlflow_db))
    monkeypatch.chdir(a)  # the project root, where DVC runs every stage
    (a / "doubler.py").write_text(DOUBLER)
    with tracking.start_run(params, "stage2") as run:
        mlflow.log_text("hello", "notes/hello.txt")
        mlflow.pyfunc.log_model(name="model", python_model=a / "doubler.py", pip_requirements=["pandas"],
                                registered_model_name="gac-test")  # fmt: skip
    mlflow.MlflowClient().set_registered_model_alias("gac-test", "challenger", "1")
    experiment = mlflow.get_experiment_by_name("gac")
    assert experiment.artifact_location == "mlruns/artifacts"
    assert mlflow.get_run(run.info.run_id).info.artifact_uri == f"mlruns/artifacts/{run.info.run_id}/artifacts"
    assert mlflow.MlflowClient().get_model_version_download_uri("gac-test", "1").startswith("mlruns/artifacts/models/")

    shutil.copytree(a, b)
    shutil.rmtree(a)
    done = subprocess.run([sys.executable, "-c", LOAD_FROM_COPY, run.info.run_id], cwd=b, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert (loaded["text"], loaded["pred"]) == ("hello", [3.0]) and "notes" in loaded["listed"]


def test_a_store_made_with_the_absolute_location_is_rewritten_relative(
    tmp_path: Path, empty_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An experiment created by an earlier GAC (absolute ``file://`` location of the same folder) is made relative,
    with its runs; an experiment elsewhere is left as it is."""
    import mlflow

    params = _params(_store(tmp_path, empty_mlflow_db))
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(params.tracking_uri)
    old = (tmp_path / "mlruns" / "artifacts").resolve().as_uri()
    mlflow.create_experiment("gac", artifact_location=old)
    other = mlflow.create_experiment("other", artifact_location=(tmp_path / "elsewhere").as_uri())
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("gac").experiment_id) as run:
        mlflow.log_text("kept", "note.txt")
    with mlflow.start_run(experiment_id=other) as elsewhere:
        pass

    tracking.setup(params)
    assert mlflow.get_experiment_by_name("gac").artifact_location == "mlruns/artifacts"
    assert mlflow.get_run(run.info.run_id).info.artifact_uri == f"mlruns/artifacts/{run.info.run_id}/artifacts"
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/note.txt") == "kept"
    assert mlflow.get_experiment(other).artifact_location == (tmp_path / "elsewhere").as_uri()
    assert mlflow.get_run(elsewhere.info.run_id).info.artifact_uri.startswith((tmp_path / "elsewhere").as_uri())


def test_mlflow_tracking_uri_wins_over_params_and_runs_record_their_store(
    tmp_path: Path, empty_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``MLFLOW_TRACKING_URI`` set, runs go there and say so; the params' database is not made. (Against a
    server, with nothing written locally at all: tests/test_team.py.)"""
    import mlflow

    team = _store(tmp_path / "team", empty_mlflow_db)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{team}")
    params = MlflowParams()  # the committed default: sqlite:///mlruns/mlflow.db, mlruns/artifacts
    with tracking.start_run(params, "stage2") as run:
        pass
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
    found = mlflow.MlflowClient(f"sqlite:///{team}").get_run(run.info.run_id)
    assert found.data.tags["gac.tracking_uri"] == f"sqlite:///{team}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.uri(params) == params.tracking_uri


def test_the_host_that_creates_the_experiment_second_uses_the_first_ones(tmp_path: Path, empty_mlflow_db: Path) -> None:
    """Two hosts' first runs on one server both find no experiment and both create it; the server refuses the second
    (RESOURCE_ALREADY_EXISTS), which must then use the first's, not fail (seen once in the two-host sweep test)."""
    import mlflow

    uri = f"sqlite:///{_store(tmp_path, empty_mlflow_db)}"
    first = mlflow.MlflowClient(uri).create_experiment("gac")  # the other host, between our lookup and our create
    tracking.use(uri)
    assert tracking._create_experiment("gac", None).experiment_id == first


@pytest.mark.parametrize("location", ["s3://team-bucket/gac", "mlflow-artifacts:/gac", "gs://b/gac"])
def test_an_artifact_location_with_a_scheme_is_kept_as_given(
    tmp_path: Path, empty_mlflow_db: Path, location: str
) -> None:
    import mlflow

    params = _params(_store(tmp_path, empty_mlflow_db)).model_copy(update={"artifact_location": location})
    tracking.setup(params)
    assert mlflow.get_experiment_by_name("gac").artifact_location == location
    assert tracking.artifact_root(params, "http://mlflow.example:5000") == location
    plain = params.model_copy(update={"artifact_location": "mlruns/artifacts"})
    assert tracking.artifact_root(plain, "http://mlflow.example:5000") is None  # the server's proxied root
    assert tracking.safe_uri("postgresql://me:secret@db:5432/mlflow") == "postgresql://db:5432/mlflow"


def test_the_relocation_matches_the_installed_mlflows_schema(empty_mlflow_db: Path) -> None:
    """:func:`gac.io.tracking._relocate` rewrites MLflow's own tables: a new MLflow schema fails here first."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{empty_mlflow_db}")
    try:
        with engine.connect() as db:
            revision = db.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
        columns = {t: {c["name"] for c in sqlalchemy.inspect(engine).get_columns(t)} for t, _, _ in
                   tracking.RELOCATED_COLUMNS}  # fmt: skip
    finally:
        engine.dispose()
    assert revision == tracking.RELOCATED_SCHEMA, f"MLflow's schema is {revision}: check _relocate, then update it"
    for table, column, by_experiment in tracking.RELOCATED_COLUMNS:
        assert column in columns[table] and (not by_experiment or "experiment_id" in columns[table])


def test_run_names_say_stage_detail_experiment_and_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    rev = tracking.git_commit()[:7]
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking.run_name("stage2") == f"stage2 · workspace @ {rev}"
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-ruin")
    assert tracking.run_name("stage2", "trial 3") == f"stage2 · trial 3 · exp bushy-ruin @ {rev}"


def test_stores_are_logged_as_dataset_inputs_with_their_content_digest_and_split_counts(
    tmp_path: Path, empty_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    store = ShardStore(tmp_path / "catalog")
    index = pd.DataFrame({"patch_id": ["a", "b", "c"], "split": ["train", "train", "test"]})
    store.write_shard("00000", index, {"s2": np.zeros((3, 12, 4, 4), np.uint16)})
    store.finalize()
    params = _params(_store(tmp_path / "project", empty_mlflow_db))
    monkeypatch.chdir(tmp_path / "project")
    with tracking.start_run(params, "stage2") as run:
        tracking.log_datasets({"catalog": store.root}, "training")
        tracking.log_datasets({"catalog": store.root}, "training")  # a resumed run logs again: still one input
    (given,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    digest = store.content_digest()
    assert given.dataset.name == "catalog" and given.dataset.digest == digest[: tracking.DATASET_DIGEST_CHARS]
    assert json.loads(given.dataset.source) == {"uri": str(store.root)}
    tags = {t.key: t.value for t in given.tags}
    assert tags["mlflow.data.context"] == "training" and tags["gac.content_sha256"] == digest
    assert (tags["tiles"], tags["tiles.train"], tags["tiles.test"]) == ("3", "2", "1")


def test_training_curves_keep_each_metric_on_its_own_rows(
    tmp_path: Path, empty_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's CSV leaves a metric blank on the other metrics' rows: those blanks are no points of its curve."""
    import mlflow

    from gac.evaluation.figures import curve_figure
    from gac.training.run_media import log_curves, read_curves

    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/psnr\n0,0,0.5,\n0,0,,18.0\n0,1,0.4,\n0,1,,19.5\n0,2,0.3,\n")
    curves = read_curves(csv)
    assert {k: (s.tolist(), v.tolist()) for k, (s, v) in curves.items()} == {
        "train/loss": ([0, 1, 2], [0.5, 0.4, 0.3]),
        "val/psnr": ([0, 1], [18.0, 19.5]),
    }
    line = curve_figure(*curves["val/psnr"], "val/psnr").axes[0].lines[0]
    assert line.get_ydata().tolist() == [18.0, 19.5]
    params = _params(_store(tmp_path / "project", empty_mlflow_db))
    monkeypatch.chdir(tmp_path / "project")
    with tracking.start_run(params, "stage2") as run:
        assert log_curves(csv, "stage2") == ["curves/train_loss.png", "curves/val_psnr.png"]
    listed = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "curves")]
    assert listed == ["curves/train_loss.png", "curves/val_psnr.png"]
