"""Bad input and concurrent writers (issue 14): one ``gac: error:`` line and a non-zero exit, nothing mixed or lost.

Each case uses the real thing: a second process that really holds an output folder's lock (or a real ``gac stage1``
run), real ``params.yaml`` files damaged by the test, a real Stage 1 cache whose fingerprint file is truncated, a real
model folder with a truncated ``params.json``, and a real full disk (a size-limited tmpfs mounted in a private mount
namespace with ``unshare``). The catalog's metadata and tile cases live in ``tests/test_catalog_input.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from gac import cli
from gac.config import CatalogParams, Stage1Params
from gac.errors import GacError
from gac.io.lock import lock_path
from gac.io.store import ShardStore

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}
#: A tiny, fast Stage 1: 1 diffusion step, random init, 2 shards of 2 tiles.
STAGE1 = {"timesteps": 1, "img_size": 128, "batch_size": 2, "shard_size": 2, "device": "cpu", "max_tiles": 4}
#: Holds the lock until the test closes its stdin (or kills it): no time limit the test could outlast.
HOLDER = textwrap.dedent(
    """
    import sys
    from gac.io.lock import exclusive
    with exclusive(sys.argv[1], "the test's holder"):
        print("held", flush=True)
        sys.stdin.read()
    """
)


@contextlib.contextmanager
def held_by_another_process(target: Path):
    """Another process holding ``target``'s lock for the ``with`` block; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def write_params(folder: Path, **sections: dict) -> Path:
    """The committed ``params.yaml`` with MLflow in ``folder`` and ``sections`` merged over their defaults."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["mlflow"] |= {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "artifact_location": str(folder / "art")}
    for name, values in sections.items():
        params[name] |= values
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def gac(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str]]:
    """Run ``gac`` in this process; return its exit status and the lines it wrote to stderr."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err.splitlines()


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Real random-init Stage 2 and Stage 3 model folders, for ``gac infer`` to get past its model checks."""
    from gac.config import Stage2Params, Stage3Params
    from gac.models.grounding import build_grounder
    from gac.models.prithvi import build_refiner
    from gac.training.export import save_model

    folder = tmp_path_factory.mktemp("models")
    s2, s3 = Stage2Params(img_size=128), Stage3Params(img_size=128)
    save_model("stage2", s2, build_refiner(s2), folder / "m2")
    save_model("stage3", s3, build_grounder(s3), folder / "m3")
    return ["--stage2-checkpoint", str(folder / "m2"), "--stage3-checkpoint", str(folder / "m3")]


@pytest.fixture(scope="module")
def catalog(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gac.data.catalog import build

    out = tmp_path_factory.mktemp("bad-input") / "catalog"
    build(CatalogParams(out=str(out), max_tiles=4, shard_size=4, workers=0), synthetic_root, progress=False)
    return out


# -- 1. one writer per output folder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["catalog", "stage1", "stage2", "stage3", "evaluate", "infer"])
def test_a_second_writer_fails_at_once_naming_the_holder(command, tmp_path, synthetic_root, catalog, capsys, request):
    out = tmp_path / "out"
    out.mkdir()
    (out / "finished.txt").write_text("the holder's work")
    params = write_params(tmp_path)
    data = {"catalog": synthetic_root, "stage1": catalog, "infer": synthetic_root}.get(command)
    argv = ["--params", params, command, "--output-dir", out, *(["--data-dir", data] if data else [])]
    if command == "infer":  # it checks its models before it takes the lock (bad input leaves no lock file)
        argv += request.getfixturevalue("model_folders")
        shutil.copy(request.getfixturevalue("empty_mlflow_db"), tmp_path / "mlflow.db")  # an existing store
    # "at once" is shown by what is absent (nothing written, one line), not by a wall-clock limit: timings belong in
    # benchmarks/, not in tests that share a machine with others
    with held_by_another_process(out) as pid:
        code, err = gac(capsys, *argv)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"gac: error: {out}: in use by pid {pid} ") and "the test's holder" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["finished.txt"]  # the holder's folder is untouched


def test_two_stage1_runs_on_one_folder_cannot_mix_their_caches(tmp_path, catalog, capsys):
    """The issue's case: the second run fails at once while the first one finishes its cache alone."""
    out = tmp_path / "opt_v1"
    first = subprocess.Popen(
        [sys.executable, "-m", "gac", "--params", write_params(tmp_path, stage1=STAGE1), "stage1",
         "--data-dir", catalog, "--output-dir", out, "--no-progress", "--metrics", tmp_path / "m1.json"],
        cwd=REPO, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # a guard only: the first run takes the lock before it builds a model
        while not (lock_path(out).is_file() and lock_path(out).read_text()):  # the holder's line: held right now
            assert first.poll() is None, f"the first run ended before it held the lock:\n{first.stdout.read()}"
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        (tmp_path / "second").mkdir()
        second = write_params(tmp_path / "second", stage1=STAGE1 | {"timesteps": 2})
        code, err = gac(capsys, "--params", second, "stage1", "--data-dir", catalog, "--output-dir", out,
                        "--metrics", tmp_path / "m2.json")  # fmt: skip
    finally:
        log, _ = first.communicate(timeout=300)
    assert code == 2 and len(err) == 1 and f"in use by pid {first.pid} " in err[0], err
    assert first.returncode == 0, log
    assert "Processed 4/4 tiles, Errors 0" in log
    assert len(ShardStore(out).index) == 4
    assert yaml.safe_load((out / "stage1.json").read_text())["timesteps"] == 1  # only the first run's settings
    assert not (tmp_path / "m2.json").exists()


# -- 2. what the model can take, before any work; nothing processed is a failure ------------------------------------
@pytest.mark.parametrize(("size", "why"), [(144, "multiple of 32"), (112, ">= 120"), (48, ">= 120")])
def test_an_img_size_terramind_cannot_take_is_refused_before_any_work(size, why, tmp_path, catalog, capsys):
    params = write_params(tmp_path, stage1=STAGE1 | {"img_size": size})
    code, err = gac(capsys, "--params", params, "stage1", "--data-dir", catalog, "--output-dir", tmp_path / "o")
    assert code == 2 and len(err) == 1 and f"params.yaml: stage1: img_size {size} " in err[0] and why in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_stage_whose_every_tile_fails_exits_non_zero_and_keeps_nothing(tmp_path, catalog):
    """What a bad size did before it was validated: every tile fails inside the model; that is no success."""
    from gac.inference import generate as stage1

    unchecked = Stage1Params(**STAGE1).model_dump() | {"img_size": 144, "out": str(tmp_path / "o")}
    p = Stage1Params.model_construct(**unchecked)

    with pytest.raises(GacError, match=r"o: all 4 tiles failed, nothing kept \(first: .+: model failed: "):
        stage1.run(p, str(catalog), progress=False)
    assert not (tmp_path / "o").exists()  # no empty "finished" shards for a rerun to trust


# -- 6, 7. params.yaml and the files GAC reads back ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "no parameters (empty or comments only"),
        (b"# stage1:\n#   timesteps: 10\n\n", "no parameters (empty or comments only"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file"),
    ],
    ids=["empty", "comments-only", "binary"],
)
def test_an_unusable_params_file_is_one_line_not_silent_defaults(content, expected, tmp_path, synthetic_root, capsys):
    params = tmp_path / "params.yaml"
    params.write_bytes(content)
    code, err = gac(capsys, "--params", params, "catalog", "--data-dir", synthetic_root, "--output-dir", tmp_path / "c")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"gac: error: {params}: {expected}"), err
    assert not (tmp_path / "c").exists()


def test_a_truncated_stage1_json_is_not_trusted_and_the_cache_is_rebuilt(tmp_path, catalog, capsys):
    params = write_params(tmp_path, stage1=STAGE1)
    out = tmp_path / "opt_v1"
    argv = ["--params", params, "stage1", "--data-dir", catalog, "--output-dir", out, "--no-progress",
            "--metrics", tmp_path / "m.json"]  # fmt: skip
    assert gac(capsys, *argv)[0] == 0
    before = ShardStore(out).content_digest()
    stamp = out / "stage1.json"
    stamp.write_text(stamp.read_text()[: len(stamp.read_text()) // 2])  # a kill or a full disk mid-write
    code, err = gac(capsys, *argv)
    assert code == 0, err
    assert yaml.safe_load(stamp.read_text())["timesteps"] == 1  # whole again
    assert yaml.safe_load((tmp_path / "m.json").read_text())["generated_this_run"] == 4  # rebuilt, not trusted
    assert ShardStore(out).content_digest() == before


def test_a_model_folder_with_a_truncated_params_json_is_one_line(tmp_path):
    from gac.training.export import PARAMS, WEIGHTS, load_model

    (tmp_path / WEIGHTS).write_bytes(b"")
    (tmp_path / PARAMS).write_text('{"stage": "stage2", "section": {"lora": {"ra')
    with pytest.raises(GacError, match=rf"^{tmp_path / PARAMS}: unreadable or truncated \(.+; expected the model's"):
        load_model(tmp_path)


# -- 7. a full disk while writing a shard ----------------------------------------------------------------------------
FULL_DISK = textwrap.dedent(
    """
    set -u
    mount -t tmpfs -o size=1200k tmpfs "$MNT"
    CATALOG="$PY -m gac --params $PARAMS catalog --data-dir $DATA --output-dir $MNT/catalog"
    $CATALOG > "$LOG/first.out" 2> "$LOG/first.err"
    echo $? > "$LOG/first.rc"
    ls -a "$MNT/catalog/shards" > "$LOG/after-first.ls"
    mount -o remount,size=20m "$MNT"
    $CATALOG > "$LOG/second.out" 2>&1
    echo $? > "$LOG/second.rc"
    ls -a "$MNT/catalog/shards" > "$LOG/after-second.ls"
    """
)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs t /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user+mount namespaces (unshare) for a tmpfs")
def test_a_full_disk_while_writing_a_shard_is_one_line_and_the_rerun_resumes(tmp_path, synthetic_root):
    """A real ENOSPC: the catalog is written into a 1.2 MB tmpfs (room for one 2-tile shard of ~0.9 MB)."""
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    mnt.mkdir()
    log.mkdir()
    params = write_params(tmp_path, catalog={"shard_size": 2, "max_tiles": 6, "workers": 0})
    env = ONE_THREAD | {"MNT": str(mnt), "LOG": str(log), "PY": sys.executable, "PARAMS": str(params),
                        "DATA": str(synthetic_root)}  # fmt: skip
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", FULL_DISK], env=env, cwd=REPO,
                   check=True, timeout=600)  # fmt: skip
    err = [line for line in (log / "first.err").read_text().splitlines() if not line.startswith("catalog: ")]
    assert (log / "first.rc").read_text().strip() == "1"
    assert [line for line in err if line] == [err[-1]], err  # besides the progress bar: one line, no traceback
    assert err[-1].startswith(f"gac: error: {mnt}/catalog/shards/00001: No space left on device; "), err
    assert "00000" in (log / "after-first.ls").read_text().split()  # the finished shard is kept
    assert not [n for n in (log / "after-first.ls").read_text().split() if n.startswith(".tmp-")]
    assert (log / "second.rc").read_text().strip() == "0", (log / "second.out").read_text()
    assert {"00000", "00001", "00002"} <= set((log / "after-second.ls").read_text().split())
    assert "Catalog: 6 tiles, 0 rejected" in (log / "second.out").read_text()


def test_a_catalog_whose_every_tile_is_rejected_exits_non_zero_and_keeps_nothing(tmp_path, synthetic_root, capsys):
    from gac.data import layout
    from gac.data.metadata import read_metadata

    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    ids = list(read_metadata(root)["patch_id"][:2])
    for patch_id in ids:
        layout.s2_band_path(root, patch_id, "B04").unlink()
    params = write_params(tmp_path, catalog={"max_tiles": 2})
    code, err = gac(capsys, "--params", params, "catalog", "--data-dir", root, "--output-dir", tmp_path / "c")
    err = [line for line in err if not line.startswith("catalog: ")]
    assert code == 2 and [line for line in err if line] == [err[-1]], err
    assert err[-1].startswith(f"gac: error: {root}: all 2 tiles rejected, no catalog written (first: {ids[0]}: "), err
    assert "B04.tif: missing band file" in err[-1]
    assert not (tmp_path / "c").exists()
