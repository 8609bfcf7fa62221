"""The catalog stage: validate, resample and pack a BigEarthNet v2 root into the tile catalog
(:mod:`gac.data.catalog`), report what was rejected, and write the DVC metrics."""

from __future__ import annotations

from typing import Any

from gac.config import Params
from gac.data import catalog
from gac.io.atomic import write_json


def run(cfg: Params, metrics: str) -> dict[str, Any]:
    """Build ``cfg.catalog.out`` from ``cfg.data.root``; returns the summary written to ``metrics``."""
    section = cfg.catalog
    report = catalog.build(section, cfg.data.root)
    for note in report.notes:
        print(f"note: {note}")
    for rec in report.rejected.itertuples():
        # A metadata row with no usable patch_id is rejected too; its reason names the row.
        label = rec.patch_id if isinstance(rec.patch_id, str) and rec.patch_id else "(no patch_id)"
        print(f"rejected {label}: {rec.reason}")
    if report.shards_kept:
        print(f"Shards: {report.shards_written} written, {report.shards_kept} kept (their source files are unchanged)")
    summary = report.summary()
    write_json(metrics, summary)
    print(
        f"Catalog: {summary['tiles']} tiles, {summary['rejected']} rejected, "
        f"{summary['tiles_per_s']} tiles/s → {section.out}"
    )
    return summary
