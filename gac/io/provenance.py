"""A cache's ``provenance.json`` (which stage and weights made it) and its timing (how fast), as evaluation reports.

Stage 1 writes its cache shard by shard and adds this file after; the refine stages write it inside their atomic
cache folder. Reading never fails on a missing file: a cache without one is still evaluated, marked unknown.

Timings live *beside* the cache (``<cache>.timing.json``), not in it: a cache is a DVC output, and seconds that differ
run to run would give identical tiles a new hash, so every stage downstream would rerun for nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gac import pipeline
from gac.errors import GacError
from gac.io.atomic import write_text
from gac.io.store import ShardStore
from gac.pipeline import StageName as S

PROVENANCE = "provenance.json"
TIMING_SUFFIX = ".timing.json"


def write_provenance(out: str | Path, info: dict[str, Any]) -> None:
    """Write a cache's ``provenance.json`` (Stage 1 writes its own cache incrementally, so it calls this after)."""
    write_text(Path(out) / PROVENANCE, json.dumps(info, indent=2, sort_keys=True))


def read_provenance(root: str | Path, stage: str) -> dict[str, Any]:
    """A cache's ``provenance.json``; a cache without one is still evaluated, with its origin marked unknown."""
    path = Path(root) / PROVENANCE
    if not path.is_file():
        return {"stage": stage, "weights_origin": f"unknown (no {PROVENANCE})", "seconds_per_tile": None,
                "model_uri": None, "registered_model": None, "version": None}  # fmt: skip
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GacError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); rerun the {stage} stage") from None
    if not isinstance(data, dict):
        raise GacError(f"{path}: expected a JSON object with weights_origin, seconds_per_tile, model_uri, ...")
    return data | read_timing(root)


def timing_path(root: str | Path) -> Path:
    """Where the timing of the cache at ``root`` lives: a sibling file, outside the DVC-tracked folder."""
    root = Path(root)
    return root.with_name(root.name + TIMING_SUFFIX)


def write_timing(root: str | Path, info: dict[str, float]) -> None:
    """Record how fast the cache at ``root`` was made (``seconds_per_tile``, ...)."""
    write_text(timing_path(root), json.dumps(info, indent=2, sort_keys=True))


def read_timing(root: str | Path) -> dict[str, Any]:
    """The timing of the cache at ``root``; empty when it was never recorded here (e.g. a cache from ``dvc pull``)."""
    path = timing_path(root)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}  # timing is informative only: a damaged file must not stop an evaluation
    return data if isinstance(data, dict) else {}




def lineage(stage: str, catalog_root: str, source_root: str) -> dict[str, str]:
    """What a stage's model is trained on, as MLflow tags (on its run and its registered version) and in the
    provenance of the cache it writes, so the chain travels on: the catalog's and the input cache's content digests,
    and who made the input — for Stage 3 the Stage 2 registered version (``gac.stage2_version``) and Stage 1's weights.
    The git revision and DVC experiment come with every run (:func:`gac.io.tracking.run_tags`)."""

    previous = pipeline.previous(stage)
    made_by = read_provenance(source_root, previous)
    tags = {
        "gac.catalog_sha256": ShardStore(catalog_root).content_digest(),
        f"gac.{previous}_cache_sha256": ShardStore(source_root).content_digest(),
        **{k: v for k, v in (made_by.get("lineage") or {}).items() if k.startswith(("gac.stage1_", "gac.stage2_"))},
    }
    if previous == S.STAGE1:
        made = {"gac.stage1_weights": made_by.get("weights_origin"), "gac.stage1_variant": made_by.get("variant")}
    else:
        made = {"gac.stage2_model": made_by.get("registered_model") or made_by.get("model_dir"),
                "gac.stage2_version": made_by.get("version")}  # fmt: skip
    return tags | {k: str(v) for k, v in made.items() if v is not None}
