"""``gac synth``: write seeded synthetic tiles in the BigEarthNet v2 layout (see :mod:`gac.data.synthetic`)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="output BigEarthNet v2 root")
    p.add_argument("--n-tiles", type=int, default=64, help="number of tiles (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--scene-side", type=int, default=0, help="first k x k tiles: one product's adjacent block (k)")


def run(args: argparse.Namespace) -> None:
    from gac.data import synthetic

    ids = synthetic.generate(args.root, args.n_tiles, seed=args.seed, scene_side=args.scene_side)
    print(f"wrote {len(ids)} synthetic tiles to {args.root}")
