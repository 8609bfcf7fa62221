"""``gac stage1``: TerraMind generation of opt_v1 (see :mod:`gac.stage1`). Works under ``torchrun`` as is."""

from __future__ import annotations

import argparse

from gac.commands import params, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="the tile catalog folder (default: catalog.out)")
    p.add_argument("--output-dir", help="opt_v1 cache folder (default: stage1.out)")
    p.add_argument("--batch-size", type=int, help="tiles per forward pass (default: stage1.batch_size)")
    p.add_argument("--timesteps", type=int, help="diffusion decoding steps (default: stage1.timesteps)")
    p.add_argument("--max-tiles", type=int, help="first N catalog tiles only (default: stage1.max_tiles)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: stage1.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--metrics", default="metrics/stage1.json", help="summary JSON for dvc metrics (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> None:
    from gac import config, stage1, tracking
    from gac.lock import exclusive_first_rank
    from gac.provenance import read_timing, write_provenance, write_timing

    cfg = params(args)
    p = config.override(
        cfg.stage1,
        out=args.output_dir,
        batch_size=args.batch_size,
        timesteps=args.timesteps,
        max_tiles=args.max_tiles,
        device=args.device,
    )
    with exclusive_first_rank(p.out):  # the cache, its provenance and timing: one writer at a time
        report = stage1.run(p, args.data_dir or cfg.catalog.out, progress=not args.no_progress)
        rank, _ = stage1._dist()
        if rank != 0:
            return
        for err in report.errors:
            print(f"error {err['patch_id']}: {err['reason']}")
        print(report.summary_line())
        origin = tracking.weights_origin(p.pretrained, p.ckpt_path)
        if report.generated:
            seconds = report.work_seconds / report.generated
            info = {"stage": "stage1", "weights_origin": origin, "variant": p.variant, "data_source": cfg.data.source}
            write_provenance(p.out, info)
            write_timing(p.out, {"seconds_per_tile": seconds})
        else:  # a run that generated nothing (all shards done) reports the speed of the run that did
            seconds = read_timing(p.out).get("seconds_per_tile")
        summary = {
            "processed": report.processed,
            "total": report.total,
            "errors": len(report.errors),
            "generated_this_run": report.generated,
            "tiles_per_s": round(1 / seconds, 4) if seconds else 0.0,
            "seconds": round(report.seconds, 2),
        }
        write_json(args.metrics, summary)
        with tracking.start_run(cfg.mlflow, "stage1", tags={"gac.stage": "stage1", "gac.data": cfg.data.source}):
            import mlflow

            mlflow.log_params(p.model_dump() | {"weights_origin": origin, "data_source": cfg.data.source})
            mlflow.log_metrics({k: float(v) for k, v in summary.items()})
            mlflow.log_text(report.summary_line() + "\n", "summary.txt")
