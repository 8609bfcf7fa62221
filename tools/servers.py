"""A team's servers on this machine: PostgreSQL, an S3 endpoint and an MLflow tracking server, on 127.0.0.1.

What ``make mlflow-server`` runs, and what the tests of the team set-up start (``tests/test_team.py``): the real
programs, each a child process, stopped in reverse order when the ``with`` block ends (or on Ctrl-C).

* **PostgreSQL** (Debian's ``postgresql`` package): a fresh cluster in ``<dir>/pg``; the MLflow backend store and
  the Optuna storage of a sweep share it, in two databases (``mlflow``, ``optuna``). Run as the ``postgres`` user when
  started by root (``initdb`` refuses root).
* **S3**: moto's stand-alone server (``moto_server``, PyPI ``moto[server]``), one bucket for MLflow's artifacts and
  one for the DVC remote. A team points the same variables at its real object store.
* **MLflow**: ``mlflow server`` with the PostgreSQL backend and ``--artifacts-destination s3://…``: artifacts go
  through the server's proxy (``mlflow-artifacts:/`` URIs), so no client needs S3 credentials or a shared disk.

``python -m tools.servers --dir .cache/team`` prints the environment each host exports and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Credentials moto accepts (any); a team's hosts export their own.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
ARTIFACT_BUCKET = "gac-mlflow"
DVC_BUCKET = "gac-dvc"
#: Seconds a server gets to accept connections; a guard only (each is polled until it answers).
START_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str:
    """A PostgreSQL program, from PATH or Debian's versioned folder."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} not found: `make postgres` installs the postgresql package")
    return found


def _wait(ready, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"{what} (rc {proc.poll()}) never became ready")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (runuser and the servers pass it on and shut down cleanly), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def postgres(folder: Path, databases: tuple[str, ...] = ()) -> Iterator[str]:
    """A throw-away PostgreSQL cluster in ``folder`` on 127.0.0.1; yields the SQLAlchemy URL of its ``postgres``
    database (``…/<name>`` for each of ``databases``, created here)."""
    import sqlalchemy

    folder.mkdir(parents=True, exist_ok=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres", "postgres")
        if subprocess.run([*as_user, "test", "-x", str(folder)], capture_output=True).returncode:
            # a root-only parent (pytest's tmp_path): the cluster lives in a folder of its own that postgres can reach
            folder.rmdir()
            folder.symlink_to(tempfile.mkdtemp(prefix="gac-pg-"))
            shutil.chown(folder.resolve(), "postgres", "postgres")
    home = folder.resolve()
    subprocess.run([*as_user, pg_bin("initdb"), "-D", str(home / "db"), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)  # fmt: skip
    port = free_port()
    server = subprocess.Popen([*as_user, pg_bin("postgres"), "-D", str(home / "db"), "-h", "127.0.0.1",
                               "-p", str(port), "-k", str(home)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"

    def ready() -> bool:
        try:
            sqlalchemy.create_engine(url).connect().close()
            return True
        except sqlalchemy.exc.OperationalError:
            return False

    try:
        _wait(ready, server, f"PostgreSQL at {url}")
        engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as db:
            for name in databases:
                db.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        yield url
    finally:
        _stop(server)
        if folder.is_symlink():
            shutil.rmtree(folder.resolve(), ignore_errors=True)
            folder.unlink()


@contextlib.contextmanager
def s3(buckets: tuple[str, ...] = (ARTIFACT_BUCKET, DVC_BUCKET)) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with ``buckets``; yields the environment a client needs to reach it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait(lambda: _answers(endpoint), server, f"the S3 endpoint {endpoint}")
        env = {**S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint}
        client = s3_client(env)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield env
    finally:
        _stop(server)


def s3_client(env: dict[str, str]):
    """A boto3 S3 client for the endpoint and keys of :func:`s3`'s environment."""
    import boto3

    keys = {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"], **keys)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError as e:
        return getattr(e, "code", None) is not None  # an HTTP error status is an answer


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str, artifacts: str, env: dict[str, str], log: Path, port: int | None = None
) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1:``port`` (default: a free one) with ``backend_uri`` and the proxied
    ``--artifacts-destination artifacts``; yields its URL. ``env`` carries the S3 endpoint and credentials: the
    server's, never the clients'."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow, "server", "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    # No server-side job execution: it serves MLflow's GenAI features (judges, trace roll-ups), which GAC does not
    # use, and costs eight Python processes that poll the database all the time.
    server_env = {**os.environ, **env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "ab") as out:
        server = subprocess.Popen(cmd, env=server_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: _answers(f"{url}/health"), server, f"the MLflow server {url} (log: {log})")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server's own workers too
        _stop(server)


@dataclass
class Team:
    """The URLs and environment of a running team set-up."""

    tracking_uri: str
    optuna_storage: str
    s3_env: dict[str, str]
    host_env: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def team(folder: Path, port: int | None = None) -> Iterator[Team]:
    """PostgreSQL (databases ``mlflow`` and ``optuna``), S3, and an MLflow server over both; see the module docstring.

    ``Team.host_env`` is what every host exports: the tracking server, and the S3 endpoint and keys only for DVC's
    remote (MLflow clients reach artifacts through the server)."""
    folder.mkdir(parents=True, exist_ok=True)
    with postgres(folder / "pg", ("mlflow", "optuna")) as pg, s3() as s3_env:
        base = pg.rsplit("/", 1)[0]
        artifacts = f"s3://{ARTIFACT_BUCKET}/artifacts"
        with mlflow_server(f"{base}/mlflow", artifacts, s3_env, folder / "mlflow.log", port) as url:
            yield Team(url, f"{base}/optuna", s3_env, {"MLFLOW_TRACKING_URI": url})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="the servers' files (default: a temp folder)")
    parser.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default: 5000)")
    args = parser.parse_args(argv)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="gac-team-"))
    if folder.exists() and any(folder.iterdir()):
        print(f"{folder}: not empty; give an empty or new --dir (the servers start fresh each time)", file=sys.stderr)
        return 2
    with team(folder, args.port) as t:
        print("# every host (MLflow artifacts go through the server):")
        print(f"export MLFLOW_TRACKING_URI={t.tracking_uri}")
        print("# a sweep's workers share the study:")
        print(f"#   gac sweep --storage {t.optuna_storage}")
        print("# DVC's S3 remote (and nothing else) needs the object store:")
        for key, value in t.s3_env.items():
            print(f"export {key}={value}")
        # blocked before the line that says so: a Ctrl-C right after it is then waited for, not a KeyboardInterrupt
        # in between (found by the reverse-order suite: exit status -2 instead of 0)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        print("# serving until Ctrl-C", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
