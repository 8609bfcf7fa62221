"""The Lightning data module of a trained stage: train on the catalog's ``train`` split, validate on ``validation``.

Kept apart from :mod:`gac.training.data` (the paired tiles themselves), so that code that only reads pairs — cache
writing, sweeps' scoring, ``gac evaluate`` — never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader

from gac.errors import GacError
from gac.io.store import ShardStore
from gac.training.data import PairDataset, rows_of


class PairDataModule(L.LightningDataModule):
    """Train on the catalog's ``train`` split, validate on ``validation`` (Lightning adds DistributedSampler)."""

    def __init__(
        self,
        catalog_root: str,
        source_root: str,
        batch_size: int,
        num_workers: int = 0,
        max_tiles: int | None = None,
        exclude: Sequence[str] = (),
        holdout: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.catalog_root, self.source_root = catalog_root, source_root
        self.batch_size, self.num_workers, self.max_tiles = batch_size, num_workers, max_tiles
        self.exclude, self.holdout = tuple(exclude), frozenset(holdout)

    def setup(self, stage: str | None = None) -> None:
        catalog, source = ShardStore(self.catalog_root), ShardStore(self.source_root)
        train = rows_of(catalog, source, "train", None, self.exclude)["patch_id"]
        self.train_ids = [p for p in train if p not in self.holdout][: self.max_tiles]
        self.val_ids = list(rows_of(catalog, source, "validation", self.max_tiles, self.exclude)["patch_id"])
        if not self.train_ids or not self.val_ids:
            raise GacError(
                f"{self.source_root}: no train/validation tiles shared with {self.catalog_root} "
                f"(train {len(self.train_ids)}, validation {len(self.val_ids)})"
            )

    def _loader(self, ids: list[str], shuffle: bool) -> DataLoader:
        return DataLoader(
            PairDataset(self.catalog_root, self.source_root, ids),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_ids, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_ids, shuffle=False)
