"""The device check for the first GPU GAC gets: every CUDA path the project has, in one call, in ≤ 8 min on one H100.

It writes ``device_check.json`` (``--out``) and prints one line per check. Checks, each timed, each with its peak
memory (``torch.cuda.max_memory_allocated``, reset between checks; on a CPU the process's peak RSS so far):

* ``stage1``: ``terramind_v1_base_generate``, 224 px, 10 steps, bf16: tiles/s batched and over a 3 x 3 scene
  (2 x 2 with ``--tiny``) with ``mosaic`` (``benchmarks/stage1_throughput.py``'s own measurement), GFLOP per tile.
* ``stage2``: ``prithvi_eo_v2_300_tl``, int8 base (bitsandbytes) + LoRA, 20 Lightning training steps of the real
  ``Stage2Task`` (L1 + MS-SSIM), bf16-mixed: s/step.
* ``stage3``: ``terramind_v1_base`` + LoRA on cross-attention, 20 steps of ``Stage3Task``, bf16-mixed: s/step.
* ``cache_engine``: the sharded engine (``gac stage1``'s) on a synthetic catalog, DataLoader workers and pinned
  host memory (pinned whenever the device is CUDA).
* ``torchrun``: ``torchrun --standalone --nproc-per-node 1 -m gac stage1`` (process group: NCCL on CUDA, gloo on CPU).

Goals printed beside the figures (for when a GPU runs it): Stage 1 ≥ 110 tiles/s with mosaic on one H100, Stage 2
int8 training ≤ 3 GB of GPU memory. ``unreached`` lists the CUDA paths one GPU cannot exercise.

    python benchmarks/device_check.py                       # on the GPU machine: real sizes
    python benchmarks/device_check.py --device cpu --tiny   # the same code, tiny models (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REAL = {"stage1": "terramind_v1_base_generate", "stage2": "prithvi_eo_v2_300_tl", "stage3": "terramind_v1_base",
        "img_size": 224, "timesteps": 10, "steps": 20, "batch": 8, "tiles": 16, "scene_side": 3}  # fmt: skip
TINY = {"stage1": "terramind_v1_tiny_generate", "stage2": "prithvi_eo_v2_tiny_tl", "stage3": "terramind_v1_tiny",
        "img_size": 128, "timesteps": 1, "steps": 2, "batch": 1, "tiles": 2, "scene_side": 2}  # fmt: skip
GOALS = {"stage1_mosaic_tiles_per_s": 110.0, "stage2_peak_gb": 3.0}
UNREACHED = [
    "DDP over several GPUs (stage2/3.train.devices > 1, strategy ddp): one GPU lent",
    "several nodes (num_nodes > 1)",
    "torchrun with more than one rank per node on CUDA",
]


def peak_gb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def check_stage1(size: dict, device: str) -> dict:
    """stage1_throughput's own run(): batched and mosaic tiles/s, FLOPs per tile."""
    spec = importlib.util.spec_from_file_location("stage1_throughput", HERE / "stage1_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    precision = "bf16" if device.startswith("cuda") else "auto"  # a CPU: bf16 where it is native (AVX512-BF16, AMX)
    args = argparse.Namespace(tiles=size["tiles"], timesteps=size["timesteps"], img_size=size["img_size"],
                              batch_size=size["batch"], variant=size["stage1"], device=device, threads=None,
                              channels_last=False, compile=False, baseline=True, precision=precision, repeats=1,
                              seed=0, mosaic=True, scene_side=size["scene_side"], profile_rows=15)  # fmt: skip
    r = bench.run(args)
    return {"variant": size["stage1"], "precision": r["p"].precision, "tiles_per_s": r["batched_tps"],
            "mosaic_tiles_per_s": r["mosaic_tps"], "gflop_per_tile": r["flops_per_tile"] / 1e9,
            "mosaic_gflop_per_tile": r["mosaic_flops_per_tile"] / 1e9, "bf16_vs_fp32": r["quality"],
            "profile": r["profile"].splitlines(), "line": bench.last_line(r, mosaic=True), "fast_path": r["fast"],
            "fast_vs_before": r["vs_before"] | {"speedup": r["batched_tps"] / r["before_tps"]}}  # fmt: skip


def check_training(stage: str, size: dict, device: str) -> dict:
    """``steps`` Lightning steps of the stage's real task on random batches; s/step after the first."""
    import lightning as L
    import torch

    from gac.config import Stage2Params, Stage3Params
    from gac.training.stage2 import Stage2Task
    from gac.training.stage3 import Stage3Task

    cuda = device.startswith("cuda")
    if stage == "stage2":
        section = Stage2Params(backbone=size["stage2"], img_size=size["img_size"], load_in_8bit=True)
        task = Stage2Task(section.model_dump())
    else:
        section = Stage3Params(variant=size["stage3"], img_size=size["img_size"])
        task = Stage3Task(section.model_dump())
    g = torch.Generator().manual_seed(0)
    n = size["batch"] * (size["steps"] + 1)
    target = torch.rand(n, 12, 120, 120, generator=g) * 0.4
    data = [{"patch_id": f"t{i}", "target": target[i], "source": (target[i] + 0.02).clamp(0, 1),
             "s1": torch.randn(2, 120, 120, generator=g) - 12.0} for i in range(n)]  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=size["batch"], pin_memory=cuda)
    stamps: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    trainer = L.Trainer(max_steps=size["steps"] + 1, accelerator="gpu" if cuda else "cpu", devices=1,
                        precision="bf16-mixed" if cuda else "32", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()])  # fmt: skip
    trainer.fit(task, train_dataloaders=loader)
    params = list(task.model.parameters())
    steps = len(stamps) - 1
    return {"steps": steps, "s_per_step": (stamps[-1] - stamps[0]) / steps, "batch": size["batch"],
            "precision": trainer.precision, "int8": stage == "stage2", "params": sum(t.numel() for t in params),
            "trainable": sum(t.numel() for t in params if t.requires_grad)}  # fmt: skip


def synthetic_catalog(where: Path, tiles: int) -> Path:
    from gac.config import CatalogParams
    from gac.data import catalog, synthetic

    synthetic.generate(where / "data", tiles, seed=0)
    catalog.build(CatalogParams(out=str(where / "catalog"), workers=0), where / "data", progress=False)
    return where / "catalog"


def check_cache_engine(size: dict, device: str, where: Path) -> dict:
    """Stage 1's sharded engine with 2 DataLoader workers (pinned memory on CUDA) over a synthetic catalog."""
    from gac.config import Stage1Params
    from gac.inference import generate

    cat = synthetic_catalog(where / "engine", size["tiles"])
    p = Stage1Params(variant=size["stage1"], img_size=size["img_size"], timesteps=size["timesteps"],
                     batch_size=size["batch"], shard_size=size["batch"], device=device, num_workers=2,
                     precision="bf16" if device.startswith("cuda") else "32",
                     out=str(where / "engine" / "opt_v1"))  # fmt: skip
    start = time.perf_counter()
    report = generate.run(p, str(cat), progress=False)
    seconds = time.perf_counter() - start
    if report.errors:
        raise RuntimeError(f"engine errors: {report.errors[:3]}")
    return {"tiles": report.processed, "tiles_per_s": report.processed / seconds, "num_workers": 2,
            "pin_memory": device.startswith("cuda")}  # fmt: skip


def check_torchrun(size: dict, device: str, where: Path) -> dict:
    """``torchrun --standalone --nproc-per-node 1 -m gac stage1`` on the engine check's catalog."""
    import yaml

    params = where / "torchrun-params.yaml"
    section = {"variant": size["stage1"], "img_size": size["img_size"], "timesteps": size["timesteps"],
               "batch_size": size["batch"], "device": "auto" if device.startswith("cuda") else "cpu"}  # fmt: skip
    mlflow = {"tracking_uri": f"sqlite:///{where}/mlflow.db", "artifact_location": str(where / "artifacts")}
    params.write_text(yaml.safe_dump({"stage1": section, "mlflow": mlflow}))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "1", "-m", "gac", "--params", str(params), "stage1",
           "--data-dir", str(where / "engine" / "catalog"), "--output-dir", str(where / "torchrun-opt_v1"),
           "--metrics", str(where / "torchrun-stage1.json"), "--no-progress"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=where, timeout=600, check=False)
    if done.returncode:
        raise RuntimeError(f"torchrun exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    return {"seconds": time.perf_counter() - start, "backend": backend,
            "metrics": json.loads((where / "torchrun-stage1.json").read_text())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny models and a few steps (CPU test)")
    parser.add_argument("--out", type=Path, default=Path("device_check.json"), help="default %(default)s")
    parser.add_argument("--only", nargs="*", help="run only these checks (default: all)")
    args = parser.parse_args(argv)
    import torch

    size = TINY if args.tiny else REAL
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("device_check: --device cuda, but torch sees no CUDA device (use --device cpu --tiny on a CPU)")
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "size": "tiny" if args.tiny else "real", "checks": {},
              "unreached": UNREACHED, "goals": GOALS}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gac-device-check-") as tmp:
        where = Path(tmp)
        checks = {"stage1": lambda: check_stage1(size, device),
                  "stage2": lambda: check_training("stage2", size, device),
                  "stage3": lambda: check_training("stage3", size, device),
                  "cache_engine": lambda: check_cache_engine(size, device, where),
                  "torchrun": lambda: check_torchrun(size, device, where)}  # fmt: skip
        for name, check in checks.items():
            if args.only and name not in args.only:
                continue
            reset_peak(device)
            start = time.perf_counter()
            try:
                figures = {"ok": True, **check()}
            except Exception as e:  # a failed check is a finding: record it and go on to the next
                figures = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            figures |= {"seconds": round(time.perf_counter() - start, 1), "peak_gb": round(peak_gb(device), 2)}
            result["checks"][name] = figures
            shown = {k: v for k, v in figures.items() if k not in ("traceback", "metrics")}
            print(f"device_check {name}: {json.dumps(shown, default=str)}", flush=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))  # after every check: a timeout keeps some
    checks = result["checks"]
    ok = all(c["ok"] for c in checks.values())
    failed = [name for name, c in checks.items() if not c["ok"]]
    verdict = f"all {len(checks)} checks ok" if not failed else f"FAILED: {', '.join(failed)}"
    print(f"device_check: {verdict} on {result['device']}; written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
