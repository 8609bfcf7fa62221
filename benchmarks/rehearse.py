"""Rehearse the real world at its real sizes: `dvc repro` end to end with the models of `configs/bigearthnet-gpu.yaml`.

A throw-away project is made from this one's working tree, with `params.yaml` = the GPU config and only what a CPU
forces changed (device, precision, step and tile counts, batch sizes, workers; random weights, so nothing is
downloaded). The data is a synthetic BigEarthNet v2 root whose first 9 tiles are one 3 x 3 scene (`gac synth
--scene-side 3`) so `stage1.mosaic` blends real windows. Then every DVC stage runs in turn (catalog, Stage 1, Stage 2,
Stage 3, evaluate, promote) and a 1-trial sweep, each under a wrapper that reads its process tree's peak RSS.

Per stage it prints total and trainable parameters (the models rebuilt here from the same params), peak RSS, seconds
per tile (the stage's wall time, start-up included, over the tiles it handled), and FLOPs per tile
(``torch.utils.flop_counter`` over one tile: Stage 1's generation, Stages 2 and 3 one training step, forward and
backward, counted on the float32 graph because bitsandbytes' int8 matmuls are invisible to the counter).

    make rehearse                          # python benchmarks/rehearse.py: the real sizes (≈ 20 min on 2 cores)
    python benchmarks/rehearse.py --tiny   # the same code with the demo's tiny models (what the test suite runs)

The last line is ``rehearsal: real sizes end to end ok, peak RSS <G> GB, slowest stage <name> <s> s/tile``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "configs" / "bigearthnet-gpu.yaml"
STAGES = ("catalog", "stage1", "stage2", "stage3", "evaluate", "promote")
#: Tiles: a 3 x 3 scene first, then isolated tiles; splits are drawn, so every split gets some.
TILES, SCENE_SIDE = 15, 3

#: What a 2-core CPU forces on the GPU config, and why (printed, so the rehearsal says what it did not rehearse).
TRAIN_ON_CPU = {"max_steps": 2, "batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 0, "precision": "32",
                "accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "num_workers": 0,
                "val_every_n_steps": 1.0, "save_every_n_steps": 1.0}  # fmt: skip
CACHE_ON_CPU = {"device": "cpu", "precision": "32", "batch_size": 4, "shard_size": 8, "num_workers": 0}
CPU = {
    "data": {"root": "data", "source": "synthetic", "exclude": []},
    "catalog": {"workers": 0, "shard_size": 8},
    "stage1": {
        "pretrained": False,
        "device": "cpu",
        "precision": "32",
        "batch_size": 2,
        "shard_size": 8,
        "num_workers": 0,
        "mosaic": True,
    },  # fmt: skip
    "stage2": {"pretrained": False, "train": TRAIN_ON_CPU, "cache": CACHE_ON_CPU},
    "stage3": {"pretrained": False, "train": TRAIN_ON_CPU, "cache": CACHE_ON_CPU},
    "evaluate": {"batch_size": 4, "n_visualize": 2, "baseline_max_tiles": 200},
    "sweep": {"n_trials": 1},
}
WHY = ("no GPU: device cpu, precision 32 (no native bf16 assumed), 2 optimizer steps, batch 2, no loader workers; "
       "no hub: random weights; no BigEarthNet: a synthetic root in its layout")  # fmt: skip
#: --tiny: the demo's models (the committed params.yaml), everything else as above.
TINY_FIELDS = {"stage1": ("variant", "img_size", "timesteps"), "stage2": ("backbone", "img_size", "load_in_8bit"),
               "stage3": ("variant", "img_size")}  # fmt: skip


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in, key by key, at every depth."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def rehearsal_params(tiny: bool) -> dict:
    """The GPU config with the CPU's changes (and, with ``tiny``, the committed params' models)."""
    params = merge(yaml.safe_load(GPU_CONFIG.read_text()), CPU)
    if tiny:
        demo = yaml.safe_load((ROOT / "params.yaml").read_text())
        params = merge(params, {s: {f: demo[s][f] for f in fields} for s, fields in TINY_FIELDS.items()})
    return params


def make_project(where: Path, params: dict) -> None:
    """This project's tracked files (as they are in the working tree) in ``where``, as a new git + DVC repository."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    skip = ("data.dvc", "dvc.lock", "sweeps/dvc.lock", "params.yaml")
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if name in skip or name.startswith(("metrics/", "plots/")) or not src.is_file():
            continue
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, where / name)
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = os.environ | {"GIT_AUTHOR_NAME": "rehearsal", "GIT_AUTHOR_EMAIL": "rehearsal@localhost",
                        "GIT_COMMITTER_NAME": "rehearsal", "GIT_COMMITTER_EMAIL": "rehearsal@localhost"}  # fmt: skip
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "rehearsal"]):
        subprocess.run(cmd, cwd=where, env=env, check=True)


#: Runs its arguments and reports the peak RSS of its process tree (Linux: a waited child's own peak and its
#: descendants' are folded into RUSAGE_CHILDREN's ru_maxrss, in KiB).
PEAK = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
        "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(done.returncode)")  # fmt: skip


def run_measured(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run ``cmd`` in ``cwd`` (output to ``log``); its wall seconds and peak RSS in GB. A failure ends the rehearsal."""
    env = os.environ | {"PYTHONPATH": str(cwd), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    with log.open("w") as out:
        cmd = [sys.executable, "-c", PEAK, *cmd]
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if done.returncode:
        sys.exit(f"rehearsal: {' '.join(cmd[3:])} failed (exit {done.returncode}); its log {log}:\n{text[-4000:]}")
    kib = int(text.rsplit("peak_rss_kib", 1)[1].split()[0])
    return seconds, kib * 1024 / 1e9


def model_figures(params: dict) -> dict[str, dict]:
    """Total/trainable parameters and FLOPs per tile of each stage's model, built here from ``params``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gac.config import parse
    from gac.inference import generate as stage1
    from gac.models import grounding, prithvi
    from gac.models.terramind import build_generator

    cfg = parse(params)
    torch.manual_seed(0)
    figures = {}
    generator = build_generator(cfg.stage1)
    s1 = torch.randn(1, 2, 120, 120) - 12.0
    with FlopCounterMode(display=False) as counter:
        stage1.generate(generator, s1, cfg.stage1, torch.device("cpu"))
    total = sum(t.numel() for t in generator.parameters())
    figures["stage1"] = {"total": total, "trainable": 0, "flops": counter.get_total_flops()}
    del generator

    opt = torch.rand(1, 12, 120, 120) * 0.3
    fp32 = cfg.stage2.model_copy(update={"load_in_8bit": False})
    for name, build, inputs in (
        ("stage2", lambda: prithvi.build_refiner(fp32), (opt,)),
        ("stage3", lambda: grounding.build_grounder(cfg.stage3), (s1, opt)),
    ):
        model = build().train()
        report = (prithvi if name == "stage2" else grounding).trainable_report(model)
        with FlopCounterMode(display=False) as counter:
            model(*inputs).mean().backward()
        figures[name] = {"total": report["total"], "trainable": report["trainable"], "flops": counter.get_total_flops()}
        del model
    if cfg.stage2.load_in_8bit:  # the int8 model's own count (its frozen base is int8 parameters)
        figures["stage2"]["total_int8_model"] = prithvi.trainable_report(prithvi.build_refiner(cfg.stage2))["total"]
    figures["sweep"] = figures["stage2"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny models (the test suite's rehearsal)")
    parser.add_argument("--dir", type=Path, help="make the throw-away project here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the throw-away project")
    parser.add_argument("--json", type=Path, help="also write the per-stage figures as JSON here")
    parser.add_argument(
        "--tiles",
        type=int,
        default=TILES,
        help=f"synthetic tiles (default {TILES}; at least 3, so every split gets one)",
    )
    parser.add_argument(
        "--scene-side",
        type=int,
        default=SCENE_SIDE,
        help=f"the first k x k tiles are one scene, for the mosaic (default {SCENE_SIDE})",
    )
    parser.add_argument("--stages", nargs="+", choices=[*STAGES, "sweep"], default=[*STAGES, "sweep"],
                        help="run only these, in pipeline order (each after its upstream; default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.tiles < max(3, args.scene_side**2):
        parser.error(f"--tiles {args.tiles}: expected at least 3 and at least the scene's {args.scene_side**2}")

    params = rehearsal_params(args.tiny)
    size = "tiny sizes" if args.tiny else "real sizes"
    where = args.dir or Path(tempfile.mkdtemp(prefix="gac-rehearse-"))
    where.mkdir(parents=True, exist_ok=True)
    print(f"rehearsal ({size}) in {where}")
    print(f"models: stage1 {params['stage1']['variant']} {params['stage1']['img_size']} px, "
          f"{params['stage1']['timesteps']} steps, mosaic; stage2 {params['stage2']['backbone']}"
          f"{' int8' if params['stage2']['load_in_8bit'] else ''} + LoRA r{params['stage2']['lora']['rank']}; "
          f"stage3 {params['stage3']['variant']} + LoRA on cross-attention")  # fmt: skip
    print(f"changed for this machine: {WHY}")
    try:
        make_project(where, params)
        logs = where / "rehearsal-logs"
        logs.mkdir()
        synth = ["gac", "synth", "--root", "data", "--n-tiles", str(args.tiles), "--scene-side", str(args.scene_side)]
        ran = {"data": run_measured(synth, where, logs / "synth.log")}
        for stage in [s for s in (*STAGES, "sweep") if s in args.stages]:
            target = "sweeps/dvc.yaml:sweep" if stage == "sweep" else stage
            ran[stage] = run_measured(["dvc", "repro", target], where, logs / f"{stage}.log")
        rows = stage_rows(where, ran, model_figures(params), args.tiles)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(where, ignore_errors=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    peak = max(r["peak_rss_gb"] for r in rows)
    slowest = max((r for r in rows if r["s_per_tile"] is not None), key=lambda r: r["s_per_tile"])
    print(f"rehearsal: {size} end to end ok, peak RSS {peak:.1f} GB, "
          f"slowest stage {slowest['stage']} {slowest['s_per_tile']:.2f} s/tile")  # fmt: skip
    return 0


def stage_rows(where: Path, ran: dict[str, tuple[float, float]], models: dict[str, dict], n_tiles: int) -> list[dict]:
    """One row per stage: wall seconds, tiles handled, s/tile, peak RSS, and the model figures where it has a model."""
    from gac.io.store import ShardStore

    index = ShardStore(where / "artifacts" / "catalog").index
    test = int((index["split"] == "test").sum())
    tiles = {"data": n_tiles, "catalog": n_tiles, "stage1": len(index), "stage2": len(index), "stage3": len(index),
             "evaluate": test, "promote": None, "sweep": len(index)}  # fmt: skip
    rows = []
    for stage, (seconds, rss) in ran.items():
        model = models.get(stage, {})
        n = tiles[stage]
        rows.append({"stage": stage, "seconds": round(seconds, 1), "tiles": n,
                     "s_per_tile": round(seconds / n, 3) if n else None, "peak_rss_gb": round(rss, 2),
                     "params": model.get("total"), "trainable": model.get("trainable"),
                     "gflop_per_tile": round(model["flops"] / 1e9, 1) if model else None})  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    def cell(v: object, fmt: str = "") -> str:
        return "-" if v is None else format(v, fmt)

    print(f"{'stage':<9} {'wall s':>8} {'tiles':>6} {'s/tile':>8} {'peak RSS GB':>12} {'params':>13} "
          f"{'trainable':>11} {'GFLOP/tile':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['stage']:<9} {r['seconds']:>8.1f} {cell(r['tiles']):>6} {cell(r['s_per_tile'], '.3f'):>8} "
              f"{r['peak_rss_gb']:>12.2f} {cell(r['params'], ',d'):>13} {cell(r['trainable'], ',d'):>11} "
              f"{cell(r['gflop_per_tile'], '.1f'):>11}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
