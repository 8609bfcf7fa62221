"""A team's DVC remote on object storage: one clone pushes the data and the catalog to S3, another pulls them.

The S3 endpoint is moto's stand-alone server (:func:`tools.servers.s3`, a real HTTP endpoint on 127.0.0.1). The two
clones share nothing on disk: separate git repositories (``git clone --no-local``: no hard-linked objects), DVC caches
in their own ``.dvc/cache``, and each its own ``HOME``, XDG folders and DVC site cache (the state and index DVC keeps
outside the repository), so nothing can reach clone B except through git and the S3 remote. The remote is configured
as a team does, in the committed ``.dvc/config``::

    dvc remote add -d team s3://gac-dvc/gac
    dvc remote modify team endpointurl http://<host>:<port>   # only for an S3-compatible store other than AWS

with the keys in the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), never in git. The clones' commands
are not given ``AWS_ENDPOINT_URL``: the ``endpointurl`` option is the only way they can find the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import yaml
from test_benchmarks import _load as load_benchmark
from test_dvc_surface import BIN, GIT_ENV, ROOT

from tools.servers import DVC_BUCKET, S3_KEYS, s3

PREFIX = "gac"  # the project's folder in the team's bucket
rehearse = load_benchmark("rehearse")  # make_project: the working tree's tracked files as a new git repository


def clone_env(home: Path, repo: Path) -> dict[str, str]:
    """The environment of one clone's commands: its own home, XDG folders and DVC site cache; the S3 keys only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "XDG_", "DVC_", "MLFLOW_S3"))}
    return env | GIT_ENV | S3_KEYS | {
        "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"), "DVC_SITE_CACHE_DIR": str(home / "dvc-site-cache"),
        "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(repo), "GAC_PROGRESS": "0",
    }  # fmt: skip


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def digests(folder: Path) -> dict[str, str]:
    """``{path relative to folder: sha256}`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_clone_pulls_from_s3_what_another_pushed_byte_for_byte(tmp_path: Path, sample_root: Path) -> None:
    wheels = sample_root.parent / "wheel-cache"  # the pinned sample wheel, downloaded once by the fixture
    a, b = tmp_path / "a", tmp_path / "b"
    env_a, env_b = clone_env(tmp_path / "home-a", a), clone_env(tmp_path / "home-b", b)
    a.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["catalog"]["workers"] = 0  # 21 tiles: no process pool to start
    rehearse.make_project(a, params)
    with s3() as server:
        endpoint = server["AWS_ENDPOINT_URL"]
        # clone A: the Makefile's `data` target, the catalog stage, the team's remote, a commit, a push
        run([sys.executable, "-m", "gac", "sample", "--root", "data", "--cache-dir", str(wheels)], a, env_a)
        run(["dvc", "add", "-q", "data"], a, env_a)
        run(["dvc", "repro", "catalog"], a, env_a)
        run(["dvc", "remote", "add", "-d", "team", f"s3://{DVC_BUCKET}/{PREFIX}"], a, env_a)
        run(["dvc", "remote", "modify", "team", "endpointurl", endpoint], a, env_a)
        run(["git", "add", "-A"], a, env_a)
        run(["git", "commit", "-qm", "data, catalog and the team remote"], a, env_a)
        assert "files pushed" in run(["dvc", "push"], a, env_a)
        cache = a / ".dvc" / "cache" / "files"
        cached = {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}
        bucket = boto3.client("s3", endpoint_url=endpoint, region_name=S3_KEYS["AWS_DEFAULT_REGION"],
                              aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        objects = bucket.list_objects_v2(Bucket=DVC_BUCKET, Prefix=f"{PREFIX}/files/")["Contents"]
        # A's cache objects under the team's prefix, laid out as the cache, the two folder listings among them
        listings = {yaml.safe_load((a / "data.dvc").read_text())["outs"][0]["md5"],
                    yaml.safe_load((a / "dvc.lock").read_text())["stages"]["catalog"]["outs"][0]["md5"]}  # fmt: skip
        keys = {o["Key"].removeprefix(f"{PREFIX}/files/") for o in objects}
        assert keys <= cached and {f"md5/{m[:2]}/{m[2:]}" for m in listings} <= keys and len(keys) > 300

        # clone B: git clone, then everything DVC-tracked through S3 only
        run(["git", "clone", "-q", "--no-local", str(a), str(b)], tmp_path, env_b)
        assert run(["dvc", "cache", "dir"], b, env_b).strip() == str(b / ".dvc" / "cache")
        assert not (b / ".dvc" / "cache").exists() and not (b / "data").exists() and not (b / "artifacts").exists()
        run(["dvc", "pull", "data.dvc", "catalog"], b, env_b)  # what A ran (the later stages have no lock yet)
        status = json.loads(run(["dvc", "status", "--json", "data.dvc", "catalog"], b, env_b))
        cloud = run(["dvc", "status", "--cloud"], b, env_b)

    assert digests(b / "data") == digests(a / "data") and len(digests(a / "data")) > 100
    assert digests(b / "artifacts" / "catalog") == digests(a / "artifacts" / "catalog")
    assert (a / "artifacts" / "catalog" / "index.parquet").is_file()
    assert status == {}, status
    assert "in sync" in cloud, cloud
