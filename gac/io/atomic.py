"""Atomic file and folder writes: a finished result is either all there or not there at all.

Every stage writes through these helpers so that a kill at any moment leaves no half-written file for the next run
(or for DVC) to mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gac.errors import GacError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (file or folder).

    The temporary name starts with ``.tmp-`` so readers that list a folder can skip unfinished work, and lives in the
    same folder so the final :func:`os.replace` is atomic on POSIX file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and target.is_dir():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path, expected: str) -> dict:
    """Read a JSON object this project wrote; a missing, truncated or foreign file is one :class:`GacError` line.

    Args:
        expected: what the file should hold, for the message (e.g. "the model's stage and parameters").
    """
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GacError(f"{path}: not found (expected {expected})") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise GacError(f"{path}: unreadable or truncated ({str(e).splitlines()[0]}; expected {expected})") from None
    if not isinstance(data, dict):
        raise GacError(f"{path}: a JSON {type(data).__name__}, expected an object with {expected}")
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write a small JSON file (DVC metrics, summaries) atomically, keys sorted so diffs are stable."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
