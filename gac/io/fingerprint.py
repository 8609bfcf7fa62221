"""Fingerprints: the record of everything that determines an output, and the one digest its parts are made with.

Every resumable output of GAC (the catalog, the opt_v1/opt_v2/opt_v3 caches, a training's checkpoints) keeps a small
JSON record beside its shards of what made it — settings, the content digests of its inputs, the tiles, the weights.
A rerun whose record differs starts over instead of resuming, so two runs' results never mix in one folder. Records
hold content, never paths or timings: the same inputs in another folder (a fresh clone) give the same record, and so
the same bytes and the same DVC hash. The digests here are the only ones the records use: sha256, hex.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Bytes read at a time when hashing a file (large checkpoints are never read whole).
CHUNK = 1 << 20


def digest(data: bytes | str) -> str:
    """sha256 of ``data`` (text as UTF-8)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 of a list of tile ids, in the order given (one per line)."""
    return digest("\n".join(ids))


def record_digest(record: Any) -> str:
    """sha256 of a JSON-able record (keys in the order given: the record's author fixes it)."""
    return digest(json.dumps(record, default=str))


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes): a cache made by other weights is another
    cache."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too (BatchNorm)
    return h.hexdigest()


def read(path: str | Path) -> dict | None:
    """A fingerprint record, or ``None`` when it is missing or unreadable (then the output is rebuilt, never
    trusted)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
