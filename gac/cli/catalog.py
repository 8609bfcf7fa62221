"""``gac catalog``: the first DVC stage (see :mod:`gac.data.catalog`)."""

from __future__ import annotations

import argparse

from gac.cli.common import params, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="BigEarthNet v2 root (default: data.root)")
    p.add_argument("--output-dir", help="catalog folder (default: catalog.out)")
    p.add_argument("--max-tiles", type=int, help="at most this many tiles (default: catalog.max_tiles)")
    p.add_argument("--splits", nargs="+", help="splits to include (default: catalog.splits)")
    p.add_argument("--workers", type=int, help="reader processes (default: catalog.workers)")
    p.add_argument(
        "--metrics", default="metrics/catalog.json", help="summary JSON for dvc metrics (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> None:
    from gac import config
    from gac.data import catalog

    cfg = params(args)
    section = config.override(
        cfg.catalog, out=args.output_dir, max_tiles=args.max_tiles, splits=args.splits, workers=args.workers
    )
    report = catalog.build(section, args.data_dir or cfg.data.root)
    for note in report.notes:
        print(f"note: {note}")
    for rec in report.rejected.itertuples():
        # A metadata row with no usable patch_id is rejected too; its reason names the row.
        label = rec.patch_id if isinstance(rec.patch_id, str) and rec.patch_id else "(no patch_id)"
        print(f"rejected {label}: {rec.reason}")
    if report.shards_kept:
        print(f"Shards: {report.shards_written} written, {report.shards_kept} kept (their source files are unchanged)")
    summary = report.summary()
    write_json(args.metrics, summary)
    print(
        f"Catalog: {summary['tiles']} tiles, {summary['rejected']} rejected, "
        f"{summary['tiles_per_s']} tiles/s → {section.out}"
    )
