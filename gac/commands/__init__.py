"""Subcommands of ``gac``: argument definitions (cheap to import) and a ``run`` that imports the real work lazily."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gac.atomic import write_text


def params(args: argparse.Namespace):
    """The validated ``params.yaml`` named by ``--params``."""
    from gac import config

    return config.load(args.params)


def write_json(path: str | Path, data: Any) -> None:
    """Write a small JSON file (DVC metrics, summaries) atomically, keys sorted so diffs are stable."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
