"""``gac promote``: move the ``champion`` alias to a challenger that meets the targets
(see :mod:`gac.mlops.promote`)."""

from __future__ import annotations

import argparse

from gac.cli.common import params, write_json

#: What ``metrics/promote.json`` holds per model (``dvc metrics show`` prints one column per key of every metrics file);
#: the checks with their numbers are printed and logged to the MLflow run as ``promote.json``.
HEADLINE = ("candidate", "champion_before", "champion_after", "promoted")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", help="registered model, repeatable (default: gac-stage2 and gac-stage3)")
    p.add_argument("--version", help="candidate version (default: the version with alias 'challenger'; one --model)")
    p.add_argument("--metrics", default="metrics/promote.json", help="decisions JSON (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    from gac.errors import GacError
    from gac.mlops.promote import promote_models

    if args.version is not None and len(args.model or []) != 1:
        raise GacError("--version needs exactly one --model (a version number means nothing across models)")

    def record(decisions) -> None:  # in the promote run, before it counts as recorded (see promote_models)
        write_json(args.metrics, {d.model: {k: d.to_dict()[k] for k in HEADLINE} for d in decisions})

    for decision in promote_models(params(args), args.model, args.version, record=record):
        print("\n".join(decision.lines()))
