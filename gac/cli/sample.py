"""``gac sample``: materialise the embedded real BigEarthNet v2 sample (see :mod:`gac.data.sample`)."""

from __future__ import annotations

import argparse

from gac.cli.common import params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="where to write the BigEarthNet v2 layout (default: data.root in params)")
    p.add_argument("--cache-dir", default=".cache", help="where the pinned wheel is downloaded (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rewrite even if ROOT/metadata.parquet exists")


def run(args: argparse.Namespace) -> None:
    from gac.data import sample

    root = args.root or params(args).data.root
    report = sample.materialise_sample(root, cache_dir=args.cache_dir, force=args.force)
    state = "already there" if report.reused else "written"
    print(f"sample: {len(report.written)} real reBEN patches {state} in {root}")
    for patch_id, reason in report.skipped.items():
        print(f"sample: skipped {patch_id}: {reason}")
