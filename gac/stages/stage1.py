"""Stage 1: TerraMind generates opt_v1 for every catalog tile (:mod:`gac.inference.generate`), then the stage records
what made the cache (provenance), how fast (timing), the DVC metrics and an MLflow run. Works under ``torchrun``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gac.config import Params, Stage1Params
from gac.inference import engine, fastpath, generate
from gac.io import tracking
from gac.io.atomic import write_json
from gac.io.lock import exclusive_first_rank
from gac.io.provenance import read_timing, write_provenance, write_timing
from gac.pipeline import StageName

NAME = StageName.STAGE1


def run(
    cfg: Params, section: Stage1Params, catalog_root: str, metrics: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Generate ``section.out`` from ``catalog_root``; returns the summary written to ``metrics`` (rank 0; ``{}`` on
    the other ranks)."""
    section, why = choose_precision(section)
    with exclusive_first_rank(section.out):  # the cache, its provenance and timing: one writer at a time
        report = generate.run(section, catalog_root, progress=progress)
        if engine.dist()[0] != 0:
            return {}
        for err in report.errors:
            print(f"error {err['patch_id']}: {err['reason']}")
        print(report.summary_line())
        origin = tracking.weights_origin(section.pretrained, section.ckpt_path)
        seconds = record(cfg, section, report, why)
        summary = {
            "processed": report.processed,
            "total": report.total,
            "errors": len(report.errors),
            "generated_this_run": report.generated,
            "tiles_per_s": round(1 / seconds, 4) if seconds else 0.0,
            "seconds": round(report.seconds, 2),
        }
        write_json(metrics, summary)
        with tracking.start_run(cfg.mlflow, NAME, tags={"gac.stage": NAME, "gac.data": cfg.data.source}):
            import mlflow

            mlflow.log_params(section.model_dump() | {"weights_origin": origin, "data_source": cfg.data.source,
                                                      "precision_choice": why})  # fmt: skip
            mlflow.log_metrics({k: float(v) for k, v in summary.items()})
            mlflow.log_text(report.summary_line() + "\n", "summary.txt")
        return summary


def choose_precision(section: Stage1Params) -> tuple[Stage1Params, str]:
    """``section`` with ``precision: auto`` resolved for its device (printed once, on rank 0), and why: the choice
    goes into the cache's provenance and the MLflow run, since bf16 and fp32 opt_v1 differ."""
    precision, why = engine.resolve_precision(engine.resolve_device(section.device), section.precision)
    if section.precision == "auto" and engine.dist()[0] == 0:
        print(f"stage1.precision: {precision} ({why})")
    return section.model_copy(update={"precision": precision}), why


def record(cfg: Params, section: Stage1Params, report: engine.Report, why: str = "set in params") -> float | None:
    """Write what made the opt_v1 cache (provenance) and how fast (timing), as ``gac evaluate`` reports them, after a
    run that generated tiles; returns the seconds per tile (of the run that generated them, when this one did not)."""
    if not report.generated:  # all shards were done: the speed is that of the run that made them
        return read_timing(section.out).get("seconds_per_tile")
    seconds = report.work_seconds / report.generated
    origin = tracking.weights_origin(section.pretrained, section.ckpt_path)
    layout = fastpath.layout(engine.resolve_device(section.device), section.precision)
    write_provenance(section.out, {"stage": NAME, "weights_origin": origin, "variant": section.variant,
                                   "data_source": cfg.data.source, "precision": section.precision,
                                   "precision_choice": why, "decoder_layout": layout,
                                   "compile": section.compile})  # fmt: skip
    write_timing(section.out, {"seconds_per_tile": seconds})
    return seconds
