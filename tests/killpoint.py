"""Kill a real ``gac`` process *inside* a shard write, at a point a seed picks, for the kill-and-resume tests.

A shard is written into a ``.tmp-`` folder and renamed into place (:meth:`gac.io.store.ShardStore.write_shard`), which
takes milliseconds: a kill from outside at a random moment almost always lands between shards, and polling for the
``.tmp-`` folder cannot catch it in time. So the process is run with an audit hook (:func:`sys.addaudithook`, the
standard hook on ``open``) that *freezes* it (SIGSTOP) at the seeded point inside one shard's write; the test waits
for that stopped state (no sleep decides anything), checks what is on disk, and SIGKILLs it there. Nothing in the
process is replaced: it runs the real CLI and dies by the real signal, at a point where any kill could land.

The point: the seed picks a shard after the first (so complete shards precede the kill) and a fraction of the way
through that shard's write, counted in the writer's Python-level call/return events (:func:`sys.setprofile`) from
the moment ``opt.npy`` is opened for writing to the moment ``digest.sha256`` is (how many a whole write takes is
counted on the first shard of the same run). Every such point leaves the shard's folder under ``.tmp-`` with its files
missing, empty, or present without the digest: half-written (with this project's indexes, ~5 % of the points fall
while ``opt.npy`` is still empty, ~60 % before ``index.parquet`` exists, the rest before the digest). The seed is
printed; ``GAC_KILL_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

SEED_ENV = "GAC_KILL_SEED"
_PAUSE_ENV = "GAC_TEST_PAUSE_IN_SHARD"

#: ``python -c RUNNER <gac args>``: the ``gac`` command with the pause hook (see the module docstring).
RUNNER = r"""
import os, re, signal, sys

target, fraction = os.environ["GAC_TEST_PAUSE_IN_SHARD"].split(":")
fraction = float(fraction)
inside = re.compile(r"[/\\]shards[/\\]\.tmp-(\d+)-[^/\\]*[/\\](\d+)[/\\]([^/\\]+)$")
state = {"shard": None, "events": 0, "pause_at": None}

def pause():
    sys.setprofile(None)
    os.kill(os.getpid(), signal.SIGSTOP)

def count(frame, event, arg):
    state["events"] += 1
    if state["events"] == state["pause_at"]:
        pause()

def hook(event, args):
    if event != "open" or len(args) < 2 or not isinstance(args[0], (str, os.PathLike)):
        return
    m = inside.search(os.fspath(args[0]))
    if m is None or m[1] != m[2] or "w" not in str(args[1]):
        return
    shard, name = m[1], m[3]
    if name == "opt.npy" and state["shard"] is None:  # a shard's write begins
        state.update(shard=shard, events=0)
        if shard == target:
            state["pause_at"] = 1 + int(fraction * state.get("whole", 0))
        sys.setprofile(count)
    elif name == "digest.sha256" and state["shard"] == shard:  # its last file: the shard is about to be complete
        sys.setprofile(None)
        if shard == target:
            pause()  # the seeded point was past this write's end: pause at its last half-written moment
        state.setdefault("whole", state["events"])
        state["shard"] = None

sys.addaudithook(hook)
from gac.cli import main
sys.exit(main(sys.argv[1:]))
"""


def seed() -> int:
    """``$GAC_KILL_SEED`` when set (a replay), else a fresh random one."""
    return int(os.environ.get(SEED_ENV) or int.from_bytes(os.urandom(4), "little"))


def kill_inside_a_shard_write(
    args: list[str], out: Path, n_shards: int, log: Path, env: dict[str, str], timeout: float = 600
) -> dict:
    """Run ``gac *args`` writing the store ``out`` and SIGKILL it inside the write of a seeded shard (not the first).

    Returns ``seed``, ``shard``, ``fraction``, ``partial`` (the half-written shard's files and sizes when it was
    killed, ``None`` if no such folder was there), ``done`` (complete shards then) and ``survived`` (their ``opt.npy``
    mtimes).
    """
    run_seed = seed()
    rng = random.Random(run_seed)
    shard, fraction = f"{rng.randrange(1, n_shards):05d}", rng.random()
    print(f"\nkill seed {run_seed}: shard {shard}, {fraction:.3f} of its write ({SEED_ENV}={run_seed} replays it)")
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, *args], stdout=f, stderr=f, env=env | {_PAUSE_ENV: f"{shard}:{fraction!r}"}
        )
    deadline = time.monotonic() + timeout
    try:
        while True:  # wait for the paused state (or an exit)
            pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"seed {run_seed}: gac never reached shard {shard}'s write in {timeout:.0f} s")
            time.sleep(0.05)
        if not os.WIFSTOPPED(status):
            pytest.fail(f"seed {run_seed}: gac ended (status {status}) before its kill:\n{log.read_text()[-3000:]}")
        folders = list((out / "shards").glob(f".tmp-{shard}-*/{shard}"))
        partial = {p.name: p.stat().st_size for p in folders[0].iterdir()} if len(folders) == 1 else None
        done = sorted(p.name for p in (out / "shards").iterdir() if not p.name.startswith(".tmp-"))
        survived = {name: (out / "shards" / name / "opt.npy").stat().st_mtime_ns for name in done}
    finally:
        proc.kill()  # SIGKILL, frozen mid-write
        proc.wait()
    print(f"killed inside shard {shard}'s write; its files then: {partial}")
    return {"seed": run_seed, "shard": shard, "fraction": fraction, "partial": partial, "done": done,
            "survived": survived}  # fmt: skip


def store_bytes(root: Path) -> dict[str, str]:
    """sha256 of every file of a store that its content determines: the shards' files and the store-level index and
    rejected lists (not the cache's provenance or timing, which name paths and seconds)."""
    files = [*(root / "shards").rglob("*"), root / "index.parquet", root / "rejected.parquet"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files) if p.is_file()}


def rerun(args: list[str], cwd: Path | None = None) -> str:
    """``gac *args`` run to completion in this process (asserting exit status 0); its standard output.

    A kill test proves what the *killed* process left behind; the run after it is an ordinary ``gac`` run over that
    folder, through the same ``main``, so it needs no fresh interpreter (which would only import torch and TerraTorch
    again). The test's own thread settings apply (one intra-op thread under pytest-xdist), as they did to its reference.
    """
    from gac.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or Path.cwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    assert code == 0, f"gac {' '.join(args)} exited {code}:\n{out.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}"
    return out.getvalue()
