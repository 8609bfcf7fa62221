"""BigEarthNet v2's ``metadata.parquet``, checked before any tile is read, and the quality flags that filter it.

A ``patch_id`` on two rows (and so one tile in two splits: leakage) refuses the whole root in one line, since no row
can be trusted over the other. A row with a null or empty ``patch_id``/``s1_name`` or a split that is no BigEarthNet
split (``holdout``, ``Train``) gets a one-line reason naming the row (:func:`row_problem`), which the catalog records
like a broken tile. A patch id whose acquisition date cannot be read (``…_20170924T93020_…``, a time with 5 digits) is
no reason to reject a valid S1/S2 pair: the date only groups results by season, so the tile is kept with season
:data:`UNKNOWN_SEASON` (:func:`acquisition`) and the catalog says once how many tiles that concerns. Only ``patch_id,
s1_name, split`` are required (what torchgeo's reader needs); a missing ``country``, ``labels``, ``s2v1_name`` or
quality flag gets a default (:func:`with_defaults`), said once per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gac.data import layout
from gac.errors import GacError

#: Season of a northern-hemisphere acquisition month (BigEarthNet covers Europe only).
SEASONS = {
    12: "winter",
    1: "winter",
    2: "winter",
    3: "spring",
    4: "spring",
    5: "spring",
    6: "summer",
    7: "summer",
    8: "summer",
    9: "autumn",
    10: "autumn",
    11: "autumn",
}
#: Season of a tile whose patch id carries no readable acquisition date (the tile is kept; see :func:`acquisition`).
UNKNOWN_SEASON = "unknown"
#: Names as BigEarthNet v2 spells them, for the reasons that reject a row.
EXAMPLE_PATCH_ID = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57"
EXAMPLE_S1_NAME = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_39"


#: ``data.exclude`` names → the reBEN metadata column that flags them.
FLAG_COLUMNS = {"cloud_or_shadow": "contains_cloud_or_shadow", "seasonal_snow": "contains_seasonal_snow"}


def flagged(index: pd.DataFrame, exclude: Sequence[str]) -> dict[str, pd.Series]:
    """``{flag: boolean mask}`` of the rows of a catalog index each flag of ``exclude`` removes (``data.exclude``)."""
    masks = {}
    for flag in exclude:
        column = FLAG_COLUMNS[flag]
        if column not in index:
            raise GacError(f"data.exclude: the catalog has no '{column}' column to filter '{flag}' on; rebuild it")
        masks[flag] = index[column].fillna(False).astype(bool)
    return masks


def keep_unflagged(index: pd.DataFrame, exclude: Sequence[str]) -> pd.DataFrame:
    """``index`` without the rows any flag of ``exclude`` marks."""
    drop = np.zeros(len(index), dtype=bool)
    for mask in flagged(index, exclude).values():
        drop |= mask.to_numpy()
    return index[~drop]


def read_metadata(root: str | Path) -> pd.DataFrame:
    """Load ``metadata.parquet``: one clear line if it is missing, not a parquet file, empty or lacks a column.

    Only :data:`~gac.data.layout.REQUIRED_COLUMNS` are required (what torchgeo's reader needs too); the others are
    filled in by :func:`with_defaults`.
    """
    path = Path(root, layout.METADATA_FILE)
    expected = f"BigEarthNet v2's metadata.parquet with at least the columns {list(layout.REQUIRED_COLUMNS)}"
    if not path.is_file():
        raise GacError(f"{path}: not found (expected {expected}; set data.root in params.yaml)")
    try:
        meta = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for empty, truncated or foreign bytes.
        why = str(e).splitlines()[0].replace(f" '{path}'", "").rstrip(".")  # pyarrow repeats the path
        raise GacError(f"{path}: not a readable parquet file ({why}; expected {expected})") from None
    missing = [c for c in layout.REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise GacError(f"{path}: missing column(s) {missing} (expected {expected})")
    if meta.empty:
        raise GacError(f"{path}: no rows (expected {expected}, one row per tile)")
    return meta.reset_index(drop=True)


def with_defaults(meta: pd.DataFrame, path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """``meta`` with every optional column (:data:`~gac.data.layout.OPTIONAL_COLUMNS`) present and no nulls in them,
    and the note to print once when a column was missing (e.g. torchgeo's own test data, which has only ``patch_id,
    s1_name, split, labels``): an unknown country or an absent flag is no reason to refuse a tile, but the user must
    know that per-country tables and ``data.exclude`` then see defaults."""
    meta = meta.copy()
    absent = [c for c in layout.OPTIONAL_COLUMNS if c not in meta.columns]
    for column, default in layout.OPTIONAL_COLUMNS.items():
        values = meta[column] if column in meta.columns else pd.Series([None] * len(meta), index=meta.index)
        if column == "labels":
            meta[column] = [[] if v is None or _is_null(v) else v for v in values]
        elif default is None:
            meta[column] = values.astype(object).where(values.notna(), None)
        else:
            meta[column] = values.astype(object).where(values.notna(), default).astype(type(default))
    if not absent:
        return meta, []
    said = ", ".join(f"{c} {_show(layout.OPTIONAL_COLUMNS[c])}" for c in absent)
    return meta, [f"{path}: no column(s) {', '.join(absent)}; every tile gets {said}"]


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _show(value: object) -> str:
    """A default as the note prints it: ``'unknown'``, ``false``, ``none``, ``[]``."""
    if isinstance(value, bool):
        return str(value).lower()
    return "[]" if value == () else "none" if value is None else repr(value)


def refuse_duplicates(meta: pd.DataFrame, path: str | Path) -> None:
    """Refuse ``meta`` when a ``patch_id`` is on two rows: there is no way to know which row is right, and one tile in
    two splits (train and test) is leakage. Rows count from 0; the first id is named, the rest are counted."""
    ids = meta["patch_id"]
    twice = meta[ids.notna() & ids.duplicated(keep=False)]
    if twice.empty:
        return
    splits = twice.groupby("patch_id", sort=False)["split"].nunique(dropna=False)
    leaked = splits[splits > 1]
    patch_id = leaked.index[0] if len(leaked) else splits.index[0]
    rows = twice.index[twice["patch_id"] == patch_id]
    where = " and ".join(f"{r} ({meta.at[r, 'split']})" for r in rows)
    what = "leakage: one tile in two splits" if len(leaked) else "the same tile twice"
    raise GacError(
        f"{path}: patch_id {patch_id!r} is on rows {where} ({what}); {len(splits)} repeated id(s) in all, "
        f"{len(leaked)} in two splits (expected each patch_id once: fix the metadata, neither row can be trusted)"
    )


def _describe(value: object) -> str:
    """What a bad name cell holds, for a reason: ``null``, ``empty``, or its type and value."""
    if _is_null(value):
        return "null"
    return "empty" if value == "" else f"{type(value).__name__} {value!r}"


def row_problem(patch_id: object, s1_name: object, split: object) -> str | None:
    """Why one metadata row cannot be a tile (a null or empty name, an unknown split), or ``None``.

    Checked before any file is read: such a row is rejected with this reason like a broken tile, never dropped and
    never allowed to abort the catalog. An unreadable acquisition date is not such a reason (:func:`acquisition`).
    """
    if not isinstance(patch_id, str) or not patch_id:
        return f"patch_id is {_describe(patch_id)} (expected the S2 patch name, e.g. {EXAMPLE_PATCH_ID})"
    if not isinstance(s1_name, str) or not s1_name:
        return f"s1_name is {_describe(s1_name)} (expected the paired S1 patch name, e.g. {EXAMPLE_S1_NAME})"
    if split not in layout.SPLITS:
        return f"split {split!r} is not a BigEarthNet split (expected one of {', '.join(layout.SPLITS)})"
    return None


def select(meta: pd.DataFrame, splits: Sequence[str], max_tiles: int | None) -> pd.DataFrame:
    """The rows the catalog looks at, in metadata order, at most ``max_tiles`` (the first ones: deterministic).

    Those are the rows of ``splits`` and the rows whose split is no BigEarthNet split at all (``holdout``, ``Train``,
    null): the latter are rejected with a reason rather than left out, so a typo cannot lose tiles without a word.
    Rows of a real split that was not asked for are left out. ``max_tiles`` counts rows, rejected ones included.
    """
    other_split = meta["split"].isin(layout.SPLITS) & ~meta["split"].isin(list(splits))
    rows = meta[~other_split]
    return (rows if max_tiles is None else rows.head(max_tiles)).reset_index(drop=True)


def acquisition(patch_id: str) -> tuple[str | None, str]:
    """Acquisition date (``YYYY-MM-DD``) and season from an S2 product-style patch id; ``(None, "unknown")``
    (:data:`UNKNOWN_SEASON`) when the id carries no readable date (``…_20170924T93020_…``).

    The date only groups results by season: a tile whose name's date cannot be read is still a valid S1/S2 pair
    (the files are found by the full name, not by the date), so it is kept, never rejected for it.
    """
    try:
        date = layout.acquisition_date(patch_id)
    except ValueError:
        return None, UNKNOWN_SEASON
    return date.isoformat(), SEASONS[date.month]
