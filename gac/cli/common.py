"""Subcommands of ``gac``: argument definitions (cheap to import) and a ``run`` that imports the real work lazily."""

from __future__ import annotations

import argparse

from gac.io.atomic import write_json


def params(args: argparse.Namespace):
    """The validated ``params.yaml`` named by ``--params``."""
    from gac import config

    return config.load(args.params)


__all__ = ["params", "write_json"]
