"""Cross-fitting of Stage 2: opt_v2 of every train tile from a model that never trained on it.

Stage 3 learns to improve opt_v2. Without cross-fitting it trains on the opt_v2 Stage 2 wrote for the very tiles
Stage 2 was fitted on — better than what any unseen tile gets at inference, so Stage 3 learns to correct a Stage 2
that is better than the real one (``gac evaluate`` measures that gap, ``leakage_gap_db`` in
``metrics/evaluate.json``). With ``stage2.cross_fit_folds: k`` (``k ≥ 2``) ``gac stage2`` also trains ``k`` fold models,
fold ``i`` on the train tiles outside fold ``i``, with the same params, and writes opt_v2 of the train tiles of fold
``i`` with fold model ``i`` (:class:`OutOfFold`); validation and test tiles — and flagged train tiles nobody trained
on — keep the main model. This is the out-of-fold scheme of stacked models (and of double/debiased ML's
cross-fitting), at the price of ``k`` more trainings.

A tile's fold is ``sha256(patch_id) mod k``: stable when tiles are added or removed, independent of order. Fold
trainings live in ``<stage2.out>/checkpoints/folds/<i>`` (inside the DVC output, so ``dvc repro`` versions them and a
rerun continues them by the usual rule of :mod:`gac.training.fit`), each with its own MLflow run tagged
``gac.cross_fit_fold`` = ``i/k``; they are not registered (the registered Stage 2 is the main model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

#: Where, under ``<stage2.out>``, fold ``i``'s training lives (``folds/<i>/{checkpoints,model,logs}``).
FOLDS_DIR = Path("checkpoints") / "folds"


def fold_of(patch_id: str, k: int) -> int:
    """The fold (``0 … k-1``) of a tile: ``sha256(patch_id) mod k``."""
    return int.from_bytes(hashlib.sha256(patch_id.encode()).digest()[:8], "big") % k


def fold_dir(out: str | Path, fold: int) -> Path:
    """The output folder of fold ``fold``'s training under a Stage 2 output folder."""
    return Path(out) / FOLDS_DIR / str(fold)


class OutOfFold(nn.Module):
    """The main model plus ``k`` fold models; :meth:`groups` routes each tile to the one that did not see it.

    Args:
        main: the model trained on every train tile (used for tiles outside ``folds``' train tiles).
        folds: fold model ``i`` was trained without the tiles ``fold_of(…) == i`` of ``train_ids``.
        train_ids: the train tiles the fold models were fitted on (only these are routed to a fold model).
        spread: also report the fold models' disagreement as σ (``stage2.cross_fit_spread``, :func:`fold_sigma`).
    """

    def __init__(
        self, main: nn.Module, folds: Sequence[nn.Module], train_ids: Iterable[str], spread: bool = False
    ) -> None:
        super().__init__()
        self.main, self.folds = main, nn.ModuleList(folds)
        self.fold = {pid: fold_of(pid, len(folds)) for pid in train_ids}
        self.spread = spread

    def groups(self, patch_ids: Sequence[str]) -> list[tuple[nn.Module, torch.Tensor]]:
        """``[(model, row positions)]`` covering ``patch_ids``: each tile goes to the model that did not train on it."""
        which = [self.fold.get(pid, -1) for pid in patch_ids]
        out = []
        for k in sorted(set(which)):
            rows = torch.tensor([i for i, w in enumerate(which) if w == k], dtype=torch.long)
            out.append((self.main if k < 0 else self.folds[k], rows))
        return out


def fold_sigma(fold_means: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """σ of a tile from the ``k`` fold models' means ``(k, B, C, H, W)`` and the σ head's σ (or ``None``).

    The k models were fitted on different tiles; where they disagree, the prediction depends on which tiles it saw —
    what the model has not learnt (epistemic), as a deep ensemble's spread measures it, and at no extra training:
    the folds exist for cross-fitting already. Their standard deviation (``k − 1``: unbiased variance) adds in
    quadrature to the head's σ (what the SAR cannot determine: aleatoric), the two being independent sources. For a
    validation or test tile no fold model saw it; for a train tile, ``k − 1`` of them did, so there the spread
    understates (those tiles are Stage 3's input, not scored).
    """
    spread = fold_means.std(0, correction=1)
    return spread if sigma is None else torch.sqrt(sigma.square() + spread.square())
