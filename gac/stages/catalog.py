"""The catalog stage: validate, resample and pack a BigEarthNet v2 root into the tile catalog
(:mod:`gac.data.catalog`), report what was rejected, and write the metrics.

:func:`build` is what every command that builds a catalog on its way (``gac catalog``, ``gac infer``, ``gac evaluate
--data-dir``) calls: each prints the same notes and ``rejected …`` lines, so no command leaves a tile out in silence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gac.config import CatalogParams, Params
from gac.data import catalog
from gac.io.atomic import write_json
from gac.pipeline import metrics_beside


def build(section: CatalogParams, root: str | Path) -> catalog.CatalogReport:
    """:func:`gac.data.catalog.build`, printing its notes, one line per rejected tile and the summary line."""
    report = catalog.build(section, root)
    for note in report.notes:
        print(f"note: {note}")
    for rec in report.rejected.itertuples():
        # A metadata row with no usable patch_id is rejected too; its reason names the row.
        label = rec.patch_id if isinstance(rec.patch_id, str) and rec.patch_id else "(no patch_id)"
        print(f"rejected {label}: {rec.reason}")
    if report.shards_kept:
        print(f"Shards: {report.shards_written} written, {report.shards_kept} kept (their source files are unchanged)")
    summary = report.summary()
    print(
        f"Catalog: {summary['tiles']} tiles, {summary['rejected']} rejected, "
        f"{summary['tiles_per_s']} tiles/s → {section.out}"
    )
    return report


def run(cfg: Params, metrics: str | Path | None = None) -> dict[str, Any]:
    """Build ``cfg.catalog.out`` from ``cfg.data.root``; returns the summary written to ``metrics`` (default:
    :func:`~gac.pipeline.metrics_beside` the catalog folder; the DVC entry point passes ``metrics/catalog.json``)."""
    summary = build(cfg.catalog, cfg.data.root).summary()
    write_json(metrics or metrics_beside(cfg.catalog.out), summary)
    return summary
