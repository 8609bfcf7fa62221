"""``gac promote``: move the ``champion`` alias to a challenger that meets the targets
(see :mod:`gac.stages.promote`)."""

from __future__ import annotations

import argparse

from gac.cli.common import params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", help="registered model, repeatable (default: gac-stage2 and gac-stage3)")
    p.add_argument("--version", help="candidate version (default: the version with alias 'challenger'; one --model)")
    p.add_argument(
        "--metrics",
        help="decisions JSON (default: none; the decisions are printed and logged to the MLflow run; the DVC stage "
        "passes metrics/promote.json)",
    )


def run(args: argparse.Namespace) -> None:
    from gac.errors import GacError
    from gac.stages import promote

    if args.version is not None and len(args.model or []) != 1:
        raise GacError("--version needs exactly one --model (a version number means nothing across models)")
    promote.run(params(args), args.metrics, args.model, args.version)
