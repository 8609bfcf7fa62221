"""A kill leaves the registry as it was or half-way, and the next run of the same kind finishes it (issue 14, case 8).

Each test makes the exact state a kill leaves in a real MLflow store (SQLite in tmp_path), then runs the operation
again: a registration cut short between creating the version and tagging it is finished, not duplicated; a promotion
killed after ``@champion`` moved is recorded (``metrics/promote.json``, a FINISHED promote run) by the next ``gac
promote``; a run a killed process left RUNNING is closed as KILLED. Promotions are killed for real (SIGKILL of a ``gac
promote`` subprocess at the chosen step); registrations are interrupted in process, which leaves the same registry
rows (MLflow commits each write) without loading a model in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_promote
from test_promote import GOOD, NAME, S3, champion, trained_on, write_params

from gac.config import MlflowParams, Stage3Params

client, register = test_promote.client, test_promote.register  # the registry fixtures of gated promotion

#: Run as ``python -c KILL <step> <gac args…>``: ``gac`` that SIGKILLs itself at ``step`` — ``alias``: right after
#: the first ``@champion`` alias moved; ``record``: when the promote run logs its record.
KILL = r"""
import os, signal, sys

import mlflow

from gac.cli import main

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "alias":
    set_alias = mlflow.MlflowClient.set_registered_model_alias

    def set_and_die(self, name, alias, version):
        set_alias(self, name, alias, version)
        if alias == "champion":
            die()

    mlflow.MlflowClient.set_registered_model_alias = set_and_die
else:
    mlflow.log_dict = die
main(sys.argv[2:])
"""


class Killed(BaseException):
    """Stands for the SIGKILL of an in-process step: not an ``Exception``, so no ``except`` on the way handles it."""


# -- registration --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Stage 3 model folder (what training exports)."""
    from gac.models.grounding import build_grounder
    from gac.training.export import save_model

    section = Stage3Params(img_size=128)
    return save_model("stage3", section, build_grounder(section), tmp_path_factory.mktemp("recovery") / "model")


@pytest.fixture
def registrar(tmp_path: Path, empty_mlflow_db: Path, model_dir: Path):
    """``(register the model in a run of its own, client)`` on a fresh store."""
    import mlflow

    from gac.io import tracking
    from gac.mlops.registry import log_and_register

    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    store = MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "artifacts"))
    tracking.setup(store)

    def run() -> str:
        with mlflow.start_run():
            return log_and_register(str(model_dir), Stage3Params(img_size=128), {"val/psnr": 12.5},
                                    tags={"gac.data": "synthetic", **trained_on("4")})  # fmt: skip

    return run, mlflow.MlflowClient(store.tracking_uri)


def versions(client, name: str = S3) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def assert_finished(client, version: str) -> None:
    """Version ``version`` is the only one, ``@challenger``, with its card and every tag a registration writes."""
    from gac.mlops.registry import CONTENT_TAG

    assert versions(client) == [version]
    tags = client.get_model_version(S3, version).tags
    assert {CONTENT_TAG, "stage", "weights_origin", "gac.data", "gac.stage2_version"} <= set(tags), tags
    assert str(client.get_model_version_by_alias(S3, "challenger").version) == version
    assert client.get_model_version(S3, version).description.startswith(f"# {S3} version {version}")


def test_a_registration_killed_before_tagging_is_finished_not_duplicated(registrar, monkeypatch, capsys):
    """Killed right after the version was created (its first write after that is the alias): the rerun finds it."""
    import mlflow

    register_model, client = registrar

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(mlflow.MlflowClient, "set_registered_model_alias", killed)
        with pytest.raises(Killed):
            register_model()
    assert versions(client) == ["1"] and "stage" not in client.get_model_version(S3, "1").tags  # cut short
    assert register_model() == "1"
    assert_finished(client, "1")
    assert f"{S3}: version 1 holds this model (its content_sha256 tag) but its registration was cut short: " in (
        capsys.readouterr().out
    )


def test_a_version_left_with_no_tags_at_all_is_recognised_by_its_files(registrar, capsys):
    """What an earlier GAC's kill left (created with no tags): found by the digest of its stored files."""
    register_model, client = registrar
    assert register_model() == "1"
    for key in client.get_model_version(S3, "1").tags:
        client.delete_model_version_tag(S3, "1", key)
    client.delete_registered_model_alias(S3, "challenger")
    assert register_model() == "1"
    assert_finished(client, "1")
    assert "(the content_sha256 of its stored files; it had no tags)" in capsys.readouterr().out


# -- promotion -----------------------------------------------------------------------------------------------------


def promote_runs(client) -> list:
    experiment = client.get_experiment_by_name("gac")
    runs = client.search_runs([experiment.experiment_id], "tags.`gac.stage` = 'promote'") if experiment else []
    return sorted(runs, key=lambda r: r.info.start_time)


@pytest.mark.parametrize(
    ("pair", "step"),
    [(False, "alias"), (False, "record"), (True, "alias")],
    ids=["after-the-alias-moved", "inside-the-record", "between-the-two-aliases-of-a-pair"],
)
def test_a_promotion_killed_midway_is_finished_and_recorded_by_the_next(tmp_path, client, register, capsys, pair, step):
    from gac.cli import main

    write_params(tmp_path)
    v = register(GOOD)
    s3 = register(GOOD, name=S3, tags=trained_on(v)) if pair else None
    out = tmp_path / "promote.json"
    args = ["--params", str(tmp_path / "params.yaml"), "promote", "--metrics", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL, step, *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert champion(client) == v and not out.exists()  # moved, recorded nowhere
    if pair:
        assert champion(client, S3) is None  # half a pair

    assert main(args) == 0
    printed = capsys.readouterr().out
    decisions = json.loads(out.read_text())
    assert decisions[NAME]["promoted"] and decisions[NAME]["champion_after"] == v
    assert f"{NAME}: version {v} promoted to champion (first champion)" in printed
    assert "resumed: gac promote run " in printed
    if pair:
        assert champion(client, S3) == s3 and decisions[S3]["promoted"] and decisions[S3]["champion_after"] == s3
        assert f"{S3}: version {s3} promoted to champion (first champion)" in printed
    first, last = promote_runs(client)  # the killed run and the one that recorded its promotion
    assert first.info.status == "KILLED" and last.info.status == "FINISHED"
    assert f"promote: run {first.info.run_id} (" in printed and "which is gone: marked KILLED" in printed
    assert last.data.metrics[f"{NAME}.promoted"] == 1.0
    assert "gac.promotion_pending" not in client.get_registered_model(NAME).tags
    assert main(args) == 0  # recorded once: the next run finds nothing left to finish
    assert "resumed" not in capsys.readouterr().out and not json.loads(out.read_text())[NAME]["promoted"]


# -- runs left RUNNING ---------------------------------------------------------------------------------------------


def test_runs_left_running_by_a_dead_process_of_this_machine_are_closed_and_only_those(tmp_path, client):
    """A gone process's run is KILLED by the next run of its stage; a live process's, another host's, another
    stage's and one with no owner are left running."""
    import socket

    from gac import config
    from gac.io import tracking

    write_params(tmp_path)
    cfg = config.load(tmp_path / "params.yaml")
    experiment = tracking.setup(cfg.mlflow)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, me = socket.gethostname(), str(os.getpid())
    owners = {"dead": (host, gone.stdout.strip(), "1"), "alive": (host, me, ""),
              "other host": ("elsewhere", gone.stdout.strip(), "1")}  # fmt: skip
    runs = {}
    for what, owner in owners.items():
        tags = {"gac.stage": "evaluate", **dict(zip(tracking.OWNER_TAGS, owner, strict=True))}
        runs[what] = client.create_run(experiment, tags=tags).info.run_id
    runs["no owner"] = client.create_run(experiment, tags={"gac.stage": "evaluate"}).info.run_id
    runs["other stage"] = client.create_run(experiment, tags={"gac.stage": "stage1", "gac.host": host,
                                                              "gac.pid": gone.stdout.strip()}).info.run_id  # fmt: skip
    with tracking.start_run(cfg.mlflow, "evaluate") as run:
        status = {what: client.get_run(run_id).info.status for what, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "other host": "RUNNING", "no owner": "RUNNING",
                      "other stage": "RUNNING"}  # fmt: skip
    assert run.data.tags["gac.pid"] == me and run.data.tags["gac.host"] == host  # the next one can judge this run


# -- the lock ------------------------------------------------------------------------------------------------------


def test_registry_updates_exclude_each_other_and_name_the_holder(tmp_path):
    """Another process holds ``gac-stage2``'s lock: an update of it fails naming that process (or waits for it),
    and a miss lets go of the locks it had taken."""
    import mlflow

    from gac.errors import GacError
    from gac.mlops.registry import lock_target, registry_lock

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    hold = (f"import mlflow, sys; from gac.mlops.registry import registry_lock; mlflow.set_tracking_uri({uri!r})\n"
            f"with registry_lock([{NAME!r}], 'gac promote'):\n"
            f"    print('held', flush=True); sys.stdin.read()")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert (tmp_path / f".mlflow.db.{NAME}.lock").is_file()
        mlflow.set_tracking_uri(uri)
        held = rf"{NAME}: in use by pid {holder.pid} on .*\(gac promote\)"
        with pytest.raises(GacError, match=held), registry_lock([S3, NAME], "registering", wait=0):
            pass
        with registry_lock([S3], "registering", wait=0):  # gac-stage3's lock was let go on the miss
            pass
        holder.stdin.close()
        with registry_lock([NAME], "registering", wait=60):  # waits for the holder to end
            pass
    finally:
        holder.kill()
        holder.wait()
    # a registry other machines share has no file to flock: it is locked on the registry (tests/test_team.py)
    assert lock_target(NAME, "postgresql://user:secret@db.example:5432/mlflow") is None
    assert lock_target(NAME, "http://mlflow.example:5000") is None
