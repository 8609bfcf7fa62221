"""Paired tiles for training and inference: (SAR, the previous stage's optical, the real optical) from the stores.

A stage trains on the catalog's ``train`` split and validates on ``validation``; tiles a previous stage rejected are
simply absent from its cache and are skipped, and tiles whose target is flagged cloudy or snowy (``data.exclude``)
are left out. Values leave here in the units the models use: S1 in dB, optical as
reflectance (:func:`gac.evaluation.metrics.to_reflectance`, DN/10000 clipped to [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from gac.data.metadata import keep_unflagged
from gac.evaluation.metrics import DN_SCALE
from gac.io.store import ShardStore


def rows_of(
    catalog: ShardStore,
    source: ShardStore,
    split: str | None,
    max_tiles: int | None = None,
    exclude: Sequence[str] = (),
) -> pd.DataFrame:
    """Patch ids present in both stores (and in ``split`` if given), less ``exclude``-flagged tiles, catalog order."""
    index = keep_unflagged(catalog.index, exclude)
    if split is not None:
        index = index[index["split"] == split]
    ids = index.loc[index["patch_id"].isin(source.index["patch_id"]), "patch_id"].tolist()  # one hash join: O(N)
    if max_tiles is not None:
        ids = ids[:max_tiles]
    return pd.DataFrame({"patch_id": ids})


class PairDataset(Dataset):
    """Items ``{patch_id, s1 (2,120,120) dB, source (12,120,120) refl, target (12,120,120) refl}``.

    Row locations are resolved once here; the stores' memory maps are opened lazily in each worker process.
    """

    def __init__(self, catalog_root: str, source_root: str, patch_ids: list[str]) -> None:
        self.catalog_root, self.source_root, self.patch_ids = catalog_root, source_root, list(patch_ids)
        self._cat = ShardStore(catalog_root).rows_for(self.patch_ids)[["shard", "row"]].to_numpy()
        self._src = ShardStore(source_root).rows_for(self.patch_ids)[["shard", "row"]].to_numpy()
        self._stores: tuple[ShardStore, ShardStore] | None = None

    def __len__(self) -> int:
        return len(self.patch_ids)

    def __getitem__(self, i: int) -> dict:
        if self._stores is None:
            self._stores = ShardStore(self.catalog_root), ShardStore(self.source_root)
        catalog, source = self._stores
        (cs, cr), (ss, sr) = self._cat[i], self._src[i]
        return {
            "patch_id": self.patch_ids[i],
            "s1": torch.from_numpy(np.array(catalog.array(cs, "s1")[int(cr)], dtype=np.float32)),  # a writable copy
            "source": reflectance(source.array(ss, "opt")[int(sr)]),
            "target": reflectance(catalog.array(cs, "s2")[int(cr)]),
        }


def reflectance(dn: np.ndarray) -> torch.Tensor:
    """L2A DN → reflectance in [0, 1] (the one convention of :mod:`gac.evaluation.metrics`)."""
    return torch.from_numpy(np.clip(np.asarray(dn, dtype=np.float32) / DN_SCALE, 0.0, 1.0))
