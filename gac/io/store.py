"""Sharded array store: the one on-disk format of the catalog and of the opt_v1/opt_v2/opt_v3 caches.

200k BigEarthNet tiles as loose files would be 200k inodes per stage and slow to list, hash (DVC) and read. A store is
instead a folder of *shards*, each a folder of ``.npy`` arrays (first axis = tile) plus the ``index.parquet`` of its
rows::

    <root>/shards/<shard>/index.parquet   patch_id and per-tile metadata, one row per tile
    <root>/shards/<shard>/<key>.npy       e.g. s2 (N, 12, 120, 120) uint16, s1 (N, 2, 120, 120) float32, opt (...)
    <root>/shards/<shard>/rejected.parquet  tiles of this shard that failed, with a reason (optional)
    <root>/shards/<shard>/digest.sha256   sha256 of the shard's files, computed once when it is written
    <root>/shards/<shard>/<name>.txt      small texts a writer keeps with the shard (e.g. the catalog's source digest)
    <root>/index.parquet                  all shards' rows with ``shard`` and ``row`` columns (written by finalize)
    <root>/rejected.parquet               all shards' rejected tiles, ``patch_id`` and ``reason`` (written by finalize)

A shard appears by one atomic folder rename, so a killed writer leaves either a whole shard or none: resuming is
"write the shards that are not there yet", and two processes writing different shards never collide. Readers memory-map
the arrays, so opening a store costs one parquet read and loading a batch costs the bytes of that batch.

A store's identity is its *content*: :meth:`ShardStore.content_digest` combines the per-shard digests written with
each shard, so it costs one small read per shard (not a pass over every byte) and does not depend on the folder the
store lives in. Training fingerprints use it to tell "the same inputs" from "new inputs" (see
:mod:`gac.training.fit`).
"""

from __future__ import annotations

import errno
import functools
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from gac.errors import GacError
from gac.io.atomic import atomic_path

SHARDS = "shards"
INDEX = "index.parquet"
REJECTED = "rejected.parquet"
DIGEST = "digest.sha256"
#: Optional array of a prediction cache: the calibrated per-pixel, per-band standard deviation (1 σ) of ``opt``, same
#: shape and DN scale. Readers use it when the whole store has it (:meth:`ShardStore.has`) and work without it.
SIGMA = "sigma"
#: Memory maps (= open files) a store object keeps at most; see :meth:`ShardStore.array`.
OPEN_MAPS = 16


def folder_digest(folder: Path) -> str:
    """sha256 over the names and bytes of a shard's files (its own digest file excluded), in name order."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != DIGEST):
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


class ShardStore:
    """A sharded array store rooted at ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- writing ---------------------------------------------------------------------------------------------------
    def write_shard(
        self,
        name: str,
        index: pd.DataFrame,
        arrays: Mapping[str, np.ndarray],
        rejected: pd.DataFrame | None = None,
        texts: Mapping[str, str] | None = None,
    ) -> None:
        """Write one whole shard atomically; ``index`` rows and every array's first axis must agree.

        ``texts`` (file name → content) are written into the shard too, so they appear and disappear with it and its
        digest covers them (the catalog keeps the digest of the source files a shard was read from this way).
        """
        for key, arr in arrays.items():
            if len(arr) != len(index):
                raise ValueError(f"shard {name}: array {key!r} has {len(arr)} rows, index has {len(index)}")
        with atomic_path(self.root / SHARDS / name) as tmp:
            tmp.mkdir()
            for key, arr in arrays.items():
                try:
                    np.save(tmp / f"{key}.npy", np.ascontiguousarray(arr), allow_pickle=False)
                except OSError as e:
                    if e.errno is not None:
                        raise
                    # NumPy reports a short write ("N requested and M written") without an errno: the disk or the
                    # quota is full. Say so as the OS would, naming the shard (the .tmp- path is gone after this).
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root / SHARDS / name)) from e
            index.reset_index(drop=True).to_parquet(tmp / INDEX, index=False)
            if rejected is not None and len(rejected):
                rejected.reset_index(drop=True).to_parquet(tmp / REJECTED, index=False)
            for file_name, text in (texts or {}).items():
                (tmp / file_name).write_text(text)
            (tmp / DIGEST).write_text(folder_digest(tmp))
        self.__dict__.pop("_shard_index", None)

    def finalize(self) -> pd.DataFrame:
        """Write the store-level ``index.parquet`` and ``rejected.parquet`` (all complete shards, in shard-name order)
        atomically; ``rejected.parquet`` is written even when empty, so a reader (or the README) can count on it."""
        index = self._concat_shard_indexes()
        with atomic_path(self.root / INDEX) as tmp:
            index.to_parquet(tmp, index=False)
        with atomic_path(self.root / REJECTED) as tmp:
            self.rejected().to_parquet(tmp, index=False)
        return index

    def clean_partial(self) -> int:
        """Remove ``.tmp-*`` leftovers of killed writers; call once before any writer starts. Returns how many."""
        import shutil

        folder = self.root / SHARDS
        stale = [p for p in folder.iterdir() if p.name.startswith(".tmp-")] if folder.is_dir() else []
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)

    # -- reading ---------------------------------------------------------------------------------------------------
    def shard_names(self) -> list[str]:
        """Names of the complete shards (unfinished ``.tmp-*`` folders are never listed)."""
        folder = self.root / SHARDS
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".tmp-"))

    def _concat_shard_indexes(self) -> pd.DataFrame:
        frames = []
        for name in self.shard_names():
            df = pd.read_parquet(self.root / SHARDS / name / INDEX)
            frames.append(df.assign(shard=name, row=np.arange(len(df))))
        if not frames:
            return pd.DataFrame({"patch_id": pd.Series(dtype=str), "shard": [], "row": []})
        return pd.concat(frames, ignore_index=True)

    def content_digest(self) -> str:
        """sha256 of the store's content: every complete shard's name and digest, in name order.

        Shards written before digests existed are hashed from their files here (and not written back: readers never
        write).
        """
        import hashlib

        names = self.shard_names()
        if not names:
            raise GacError(f"{self.root}: not a GAC store or an empty one (expected {SHARDS}/<shard>/ folders)")
        h = hashlib.sha256()
        for name in names:
            folder = self.root / SHARDS / name
            digest = (folder / DIGEST).read_text().strip() if (folder / DIGEST).is_file() else folder_digest(folder)
            h.update(f"{name}:{digest}\n".encode())
        return h.hexdigest()

    @functools.cached_property
    def index(self) -> pd.DataFrame:
        """All tiles of the store; from the finalised index when there is one, else from the shards."""
        path = self.root / INDEX
        if path.is_file():
            return pd.read_parquet(path)
        if not (self.root / SHARDS).is_dir():
            raise GacError(f"{self.root}: not a GAC store (expected {SHARDS}/ or {INDEX}; run the stage that makes it)")
        return self._concat_shard_indexes()

    def rejected(self) -> pd.DataFrame:
        """Tiles that failed in any shard, with their ``reason``, read from the shards (always current, also between a
        shard write and :meth:`finalize`)."""
        frames = [
            pd.read_parquet(p) for name in self.shard_names() if (p := self.root / SHARDS / name / REJECTED).is_file()
        ]
        if frames:
            return pd.concat(frames, ignore_index=True)
        return pd.DataFrame({"patch_id": pd.Series(dtype=str), "reason": pd.Series(dtype=str)})

    def shard_text(self, shard: str, name: str) -> str | None:
        """The text file ``name`` kept with ``shard`` (see :meth:`write_shard`), or ``None`` when it has none."""
        path = self.root / SHARDS / shard / name
        return path.read_text() if path.is_file() else None

    def array(self, shard: str, key: str) -> np.ndarray:
        """Memory-mapped array ``key`` of ``shard``, from a small LRU of open maps.

        Each memory map holds a file descriptor; keeping every one open would run out of files at BigEarthNet scale
        (tens of thousands of shards), so at most :data:`OPEN_MAPS` maps stay open per store object. A shuffled reader
        reopens a map now and then (an ``open`` + ``mmap``, microseconds), which costs far less than it reads.
        """
        maps = self.__dict__.setdefault("_maps", OrderedDict())
        if (shard, key) in maps:
            maps.move_to_end((shard, key))
            return maps[(shard, key)]
        path = self.root / SHARDS / shard / f"{key}.npy"
        if not path.is_file():
            raise GacError(f"{path}: missing array {key!r} (expected one of the keys the writing stage stores)")
        maps[(shard, key)] = array = np.load(path, mmap_mode="r")
        if len(maps) > OPEN_MAPS:
            maps.popitem(last=False)
        return array

    def has(self, key: str) -> bool:
        """Whether every complete shard holds array ``key``: an optional array (e.g. ``sigma``, the prediction's
        standard deviation) is used only when the whole store has it, so a reader never mixes tiles with and without."""
        names = self.shard_names()
        return bool(names) and all((self.root / SHARDS / name / f"{key}.npy").is_file() for name in names)

    def __len__(self) -> int:
        return len(self.index)

    def read(self, key: str, rows: pd.DataFrame | None = None) -> np.ndarray:
        """Stack array ``key`` for ``rows`` (a slice of :attr:`index`; all tiles when ``None``), in row order."""
        rows = self.index if rows is None else rows
        if not len(rows):
            raise GacError(f"{self.root}: no tiles selected")
        out = None
        for i, (shard, row) in enumerate(zip(rows["shard"], rows["row"], strict=True)):
            arr = self.array(shard, key)
            if out is None:
                out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
            out[i] = arr[row]
        return out

    def read_optional(self, key: str, patch_ids: Iterable[str]) -> np.ndarray | None:
        """:meth:`read` of ``key`` for ``patch_ids`` (in that order) when the store has it (:meth:`has`), else
        ``None``: for optional arrays such as :data:`SIGMA`."""
        return self.read(key, self.rows_for(patch_ids)) if self.has(key) else None

    def rows_for(self, patch_ids: Iterable[str]) -> pd.DataFrame:
        """Index rows for ``patch_ids`` in the given order, one per id.

        A clear error names the first missing id, and a store that holds an id twice is refused: ``.loc`` would return
        both rows, and every caller pairs the result with ``patch_ids`` position by position (training pairs would
        shift by one from there on).
        """
        patch_ids = list(patch_ids)
        by_id = self.index.set_index("patch_id", drop=False)
        if not by_id.index.is_unique:
            twice = by_id.index[by_id.index.duplicated()].unique()
            raise GacError(
                f"{self.root}: tile {twice[0]!r} is in the store more than once ({len(twice)} such ids in all; "
                "expected each patch_id once: rebuild the store from metadata without duplicate ids)"
            )
        missing = [p for p in patch_ids if p not in by_id.index]
        if missing:
            raise GacError(f"{self.root}: tile {missing[0]!r} not in the store ({len(missing)} missing in all)")
        return by_id.loc[patch_ids].reset_index(drop=True)
