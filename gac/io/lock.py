"""Exclusive locks on the folders a stage writes, so two writers can never mix their results.

Two ``gac stage1`` runs on one output folder would each resume "the" cache and each write shards of their own
settings into it; both would report success. Every stage therefore holds an advisory ``flock`` on a lock file beside
its output folder (``<parent>/.<name>.lock``, outside the folder itself, so deleting and rebuilding the folder — and
DVC hashing it — never touches the lock) for as long as it writes. A second writer fails at once with one line naming
the holder. The kernel drops a ``flock`` when its process dies, so a killed run never leaves a stale lock behind.

``flock`` is local to one machine (and to NFS servers that forward it); ranks of one ``torchrun`` job share an output
folder on purpose, so only rank 0 takes the lock (:func:`gac.inference.engine.run`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gac.errors import GacError

#: Lock files this process holds (a second ``flock`` on a new descriptor would block against our own lock).
_held: set[Path] = set()


def lock_path(target: str | Path) -> Path:
    """The lock file that guards ``target`` (a folder or file): a hidden sibling, never inside it."""
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive(target: str | Path, what: str = "", wait: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive lock on ``target`` for the ``with`` block; raise :class:`GacError` if another process has it.

    Args:
        target: the output folder (or file) to guard.
        what: who is writing, for the message a second writer sees (default: this process's command line).
        wait: seconds to wait for a holder to finish before giving up (0: fail at once, the rule for outputs: a second
            writer should hear at once that it would mix results; short serialised sections such as creating an
            MLflow store wait instead).
    """
    path = lock_path(target)
    if path in _held:  # re-entrant in one process: a command may hold the lock around the engine, which takes it too
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                raise GacError(f"{target}: in use by {holder}; wait for it to finish or write elsewhere") from None
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        command = what or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command}) since {now}".encode(), 0)
        _held.add(path)
        try:
            yield path
        finally:
            _held.discard(path)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def exclusive_first_rank(target: str | Path, what: str = ""):
    """:func:`exclusive` on the first process of a distributed job (``RANK``/``LOCAL_RANK`` unset or 0), a no-op on
    the others: their parent (torchrun, or Lightning's launcher re-running this command) already holds it."""
    first = all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK"))
    return exclusive(target, what) if first else contextlib.nullcontext()
