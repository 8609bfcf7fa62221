"""Benchmark: Stage 1's batched generation vs a naive per-tile loop, side by side in one run, with FLOP/s.

Why: Stage 1 runs TerraMind once per tile of the catalog (200k tiles for BigEarthNet v2), so its throughput is the
stage's cost. The batched path (:func:`gac.inference.generate.generate` on ``--batch-size`` tiles, what ``gac stage1``
runs) is
compared with the naive loop (the same call on one tile at a time) over the same model, tiles and per-call seeds:

* tiles/s of both and their ratio;
* achieved FLOP/s of the batched path: FLOPs per tile counted by ``torch.utils.flop_counter.FlopCounterMode`` over
  one batched call (matmuls, convolutions, attention) times the batched tiles/s, as a share of this machine's matmul
  peak measured in the same run (a large ``torch.matmul``, fp32 and bf16, best of several reps);
* where the time goes: the TerraMind sampler (token generation) vs the tokenizer's diffusion decoder;
* with ``--mosaic``, the mosaic path (``stage1.mosaic: true``, :func:`gac.inference.generate.generate_scenes`) beside
them on a
  synthetic scene of ``--scene-side`` x ``--scene-side`` adjacent tiles (the synthetic tiles placed on one product's
  grid, grouped by :func:`gac.inference.mosaic.scenes`): FLOPs per tile and tiles/s of both, and a last line
  ``mosaic vs per-tile at <px> px: FLOPs per tile <r>x, tiles/s <s>x`` against the batched per-tile path (each tile
  padded to ``img_size`` on its own, ``--batch-size`` tiles per call; the mosaic path puts ``--batch-size`` windows
  in a call). Windows of 224 px overlapping by 32 px cover (192/120)^2 = 2.6 tiles each, where a padded tile is one.

Both paths run alternately, best of ``--repeats`` each, so that load from other processes hits both alike. On a CPU
the diffusion decoder's convolutions are compute-bound even for one tile, so the batched path's gain is bounded by how
far the naive loop already is from the matmul peak; on a GPU one 128 px tile leaves most of the device idle.

Usage::

    python benchmarks/stage1_throughput.py                       # 8 synthetic tiles, 2 steps, 128 px, batch 4
    python benchmarks/stage1_throughput.py --tiles 16 --batch-size 8 --device cuda
    python benchmarks/stage1_throughput.py --mosaic --img-size 224   # + the mosaic path on a 5 x 5 tile scene
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def synthetic_s1(n_tiles: int, seed: int) -> np.ndarray:
    """S1 dB of ``n_tiles`` synthetic tiles, through the real catalog stage (so the input is what Stage 1 reads)."""
    from gac.config import CatalogParams
    from gac.data.catalog import build
    from gac.data.synthetic import generate
    from gac.io.store import ShardStore

    with tempfile.TemporaryDirectory(prefix="gac-bench-") as tmp:
        generate(Path(tmp, "raw"), n_tiles, seed=seed)
        build(CatalogParams(out=str(Path(tmp, "catalog")), workers=0), Path(tmp, "raw"), progress=False)
        return ShardStore(Path(tmp, "catalog")).read("s1")


def scene_places(side: int) -> list:
    """The :class:`gac.inference.mosaic.Place` of ``side`` x ``side`` adjacent tiles of one product (row-major), found
    by
    :func:`gac.inference.mosaic.scenes` from catalog-like rows: patch ids on the grid and the transforms that agree with
    it."""
    import pandas as pd

    from gac.inference import mosaic

    product = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP"
    cells = [(r, c) for r in range(side) for c in range(side)]
    index = pd.DataFrame(
        {
            "patch_id": [f"{product}_{40 + c}_{50 + r}" for r, c in cells],
            "crs": "EPSG:32633",
            "transform": [
                [10.0, 0.0, 300000.0 + 1200 * (40 + c), 0.0, -10.0, 5400000.0 - 1200 * (50 + r)] for r, c in cells
            ],
        }
    )
    rows, places = mosaic.scenes(index, max_side=side)
    assert rows[mosaic.SCENE].nunique() == 1 and list(rows["patch_id"]) == list(index["patch_id"])
    return [places[pid] for pid in rows["patch_id"]]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, max_n: int = 2048, reps: int = 5) -> tuple[float, int]:
    """Best FLOP/s of a square matmul in ``dtype`` (the machine's practical dense peak) and the size it used.

    The size doubles from 512 up to ``max_n`` while one product takes under 0.2 s, so a dtype without hardware
    support (bf16 on a CPU without AVX512-BF16/AMX runs at well under 1 GFLOP/s) costs seconds, not minutes.
    """
    import torch

    n = 512
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        first = timed(functools.partial(torch.matmul, a, b), device)  # also the warm-up (library, kernel choice)
        if n >= max_n or first > 0.2:
            break
        n *= 2
    best = min(timed(functools.partial(torch.matmul, a, b), device) for _ in range(reps))
    return 2 * n**3 / best, n


def timed(fn: Callable[[], object], device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def split_time(model, fn: Callable[[], object], device) -> dict[str, float]:
    """Wall time of the sampler and of the diffusion decoder inside one call of ``fn`` (wrapped, then restored)."""
    spent = {"sampler": 0.0, "decoder": 0.0}

    def wrap(obj, name: str, key: str):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            sync(device)
            spent[key] += time.perf_counter() - start
            return out

        setattr(obj, name, wrapper)
        return original

    sampler = wrap(model.sampler, "generate", "sampler")
    decoders = {k: wrap(tok, "decode_tokens", "decoder") for k, tok in model.tokenizer.items()}
    try:
        spent["total"] = timed(fn, device)
    finally:
        model.sampler.generate = sampler
        for k, original in decoders.items():
            model.tokenizer[k].decode_tokens = original
    return spent


def wake(model) -> None:
    """Give the layers TerraMind's diffusion decoder zero-initialises PyTorch's default init, in place.

    A random-init decoder returns the per-band pretraining mean for every pixel whatever the SAR (its residual,
    attention and output convolutions start at zero), so bf16 and fp32 would agree trivially; woken, the output depends
    on the SAR and the noise as a trained model's does. FLOPs and timings are the same either way.
    """
    import math

    import torch

    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1 and not weight.any():
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def profiler_activities(device) -> list:
    import torch

    cpu = [torch.profiler.ProfilerActivity.CPU]
    return cpu + [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else cpu


def agreement(a: dict, b: dict, s1, p, device, seed: int) -> dict[str, float]:
    """PSNR (dB) and SAM (degrees) of opt_v1 from ``a`` against ``b`` (each ``{"model": …, "precision": …}``): the
    same tiles and seeds, both rounded to the uint16 DN the cache stores; ``identical`` when every DN agrees."""
    import numpy as np
    import torch

    from gac.evaluation import metrics
    from gac.inference import engine
    from gac.inference import generate as stage1

    out = []
    for side in (a, b):
        stage1.seed_batch(seed, "quality", 0)
        dn = stage1.generate(side["model"], s1, p.model_copy(update={"precision": side["precision"]}), device)
        out.append(torch.from_numpy(engine.to_dn(dn.numpy()).astype(np.float32)))
    ref = [metrics.to_reflectance(x) for x in out]
    return {"psnr": metrics.psnr(*ref).mean().item(), "sam_deg": metrics.sam_deg(*ref).mean().item(),
            "identical": bool(torch.equal(*out))}  # fmt: skip


def bf16_vs_fp32(model, reference, s1, p, device, seed: int) -> dict[str, float] | None:
    """bf16 opt_v1 as ``gac stage1`` makes it (``model`` where the run is bf16, else a copy of ``reference`` put on
    the bf16 fast path) against fp32 opt_v1 of ``reference`` (as built); ``None`` where the device has no native
    bf16."""
    import copy

    from gac.inference import engine, fastpath

    if not engine.native_bf16(device):
        return None
    bf16 = p.model_copy(update={"precision": "bf16"})
    if p.precision != "bf16":
        model = copy.deepcopy(reference)
        fastpath.prepare(model, bf16, device)
    return agreement({"model": model, "precision": "bf16"}, {"model": reference, "precision": "32"}, s1, p, device,
                     seed)  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gac.config import Stage1Params
    from gac.inference import engine, fastpath
    from gac.inference import generate as stage1
    from gac.models.terramind import build_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    device = stage1.resolve_device(args.device)
    p = Stage1Params(
        variant=args.variant,
        timesteps=args.timesteps,
        img_size=args.img_size,
        batch_size=args.batch_size,
        precision=engine.resolve_precision(device, args.precision)[0],
        compile=args.compile,
    )
    stage1.check_precision(device, p.precision)
    peaks = {"32": matmul_peak(device, torch.float32, reps=10), "bf16": matmul_peak(device, torch.bfloat16, reps=3)}
    if p.precision == "16":
        peaks["16"] = matmul_peak(device, torch.float16, reps=3)
    places = scene_places(args.scene_side) if args.mosaic else []
    s1 = torch.from_numpy(synthetic_s1(len(places) or args.tiles, args.seed))
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = build_generator(p).to(device)
    build_s = time.perf_counter() - start
    wake(model)
    reference = copy.deepcopy(model)  # as built: fp32 weights, NCHW, eager (bf16 vs fp32, and --baseline)
    fast = fastpath.prepare(model, p, device)  # what gac stage1 runs
    if args.channels_last:  # the convolutions live in the tokenizer's diffusion decoder (a UNet)
        model.tokenizer.to(memory_format=torch.channels_last)
        fast["layout"] = "channels_last"

    def batched() -> None:
        for b, i in enumerate(range(0, len(s1), p.batch_size)):
            stage1.seed_batch(args.seed, "bench", b)
            stage1.generate(model, s1[i : i + p.batch_size], p, device)

    def naive() -> None:
        for i in range(len(s1)):
            stage1.seed_batch(args.seed, "bench", i)
            stage1.generate(model, s1[i : i + 1], p, device)

    def scene() -> None:  # the whole scene is one engine batch: seeded once, like gac stage1 seeds it
        stage1.seed_batch(args.seed, "bench", 0)
        stage1.generate_scenes(model, s1, places, p, device)

    def before() -> None:  # the batched path as it ran before the fast path: per-call casts, NCHW, eager
        for b, i in enumerate(range(0, len(s1), p.batch_size)):
            stage1.seed_batch(args.seed, "bench", b)
            stage1.generate(reference, s1[i : i + p.batch_size], p, device)

    paths = {"batched": batched, "naive": naive} | ({"mosaic": scene} if args.mosaic else {})
    paths |= {"before": before} if args.baseline else {}
    # Warm-up at every shape (oneDNN/cuDNN pick and cache kernels per shape on the first call; with --compile, inductor
    # compiles one graph per shape: that time is kept), then the paths alternately, best of --repeats each, so that
    # load from other processes hits all alike.
    warmup = {
        "batched": lambda: stage1.generate(model, s1[: p.batch_size], p, device),
        "naive": lambda: stage1.generate(model, s1[:1], p, device),
        "mosaic": lambda: stage1.generate_scenes(model, s1, places, p, device),
        "before": lambda: stage1.generate(reference, s1[: p.batch_size], p, device),
    }
    first = {path: timed(warmup[path], device) for path in paths}
    passes: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
    for _ in range(args.repeats):
        for path, fn in paths.items():
            passes[path].append(split_time(model if path != "before" else reference, fn, device))
    best = {path: min(runs, key=lambda r: r["total"]) for path, runs in passes.items()}
    # FLOPs counted on the eager model (the same operations; a compiled graph would be traced again under the mode)
    with FlopCounterMode(display=False) as counter:
        stage1.generate(reference, s1[: p.batch_size], p, device)
    flops_per_tile = counter.get_total_flops() / p.batch_size
    mosaic_flops = None
    if args.mosaic:
        with FlopCounterMode(display=False) as counter:
            stage1.generate_scenes(reference, s1, places, p, device)
        mosaic_flops = counter.get_total_flops() / len(s1)
    with torch.profiler.profile(activities=profiler_activities(device)) as prof:
        batched()
    by_op = prof.key_averages().table(sort_by=f"self_{'cuda' if device.type == 'cuda' else 'cpu'}_time_total",
                                      row_limit=args.profile_rows)  # fmt: skip
    vs_before = None
    if args.baseline:
        sides = ({"model": m, "precision": p.precision} for m in (model, reference))
        vs_before = agreement(*sides, s1[: p.batch_size], p, device, args.seed)
    compile_s = None  # last: it recompiles
    if args.compile:  # first calls minus a steady call of each shape; then again from inductor's caches (cache hit)
        steady = timed(warmup["batched"], device)
        cold = sum(first[k] for k in ("batched", "naive", "mosaic") if k in first)
        cold -= steady + timed(warmup["naive"], device) + (timed(warmup["mosaic"], device) if args.mosaic else 0)
        torch._dynamo.reset()
        fastpath.prepare(model, p, device)
        warm = timed(warmup["batched"], device) - steady
        compile_s = {"cold": cold, "warm": warm}

    batched_tps = len(s1) / best["batched"]["total"]
    naive_tps = len(s1) / best["naive"]["total"]
    return {
        "tiles": len(s1),
        "mosaic_tps": len(s1) / best["mosaic"]["total"] if args.mosaic else None,
        "mosaic_flops_per_tile": mosaic_flops,
        "p": p,
        "device": device,
        "threads": torch.get_num_threads(),
        "build_s": build_s,
        "batched_tps": batched_tps,
        "naive_tps": naive_tps,
        "flops_per_tile": flops_per_tile,
        "achieved": flops_per_tile * batched_tps,
        "naive_achieved": flops_per_tile * naive_tps,
        "parts": best,
        "peaks": peaks,
        "profile": by_op,
        "quality": bf16_vs_fp32(model, reference, s1[: p.batch_size], p, device, args.seed),
        "fast": fast,
        "compile_s": compile_s,
        "vs_before": vs_before,
        "before_tps": len(s1) / best["before"]["total"] if args.baseline else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=8, help="synthetic tiles (default %(default)s)")
    parser.add_argument("--timesteps", type=int, default=2, help="diffusion steps (default %(default)s)")
    parser.add_argument("--img-size", type=int, default=128, help="model input size (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per batched call (default %(default)s)")
    parser.add_argument("--variant", default="terramind_v1_tiny_generate", help="default %(default)s")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default %(default)s)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC decoder on any CPU (default: AMX bf16)")
    parser.add_argument("--compile", action="store_true", help="stage1.compile: torch.compile the diffusion decoder")
    parser.add_argument("--baseline", action="store_true", help="also the batched path as before the fast path")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16", "auto"], help="as stage1.precision")
    parser.add_argument("--profile-rows", type=int, default=15, help="operators in the profile table (%(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per path, best kept (%(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mosaic", action="store_true", help="also the mosaic path, on a synthetic scene")
    parser.add_argument("--scene-side", type=int, default=5, help="tiles per side of that scene (%(default)s)")
    args = parser.parse_args(argv)

    r = run(args)
    p, giga = r["p"], 1e9
    fast = r["fast"]
    weights = f"weights cast once to {p.precision}: {fast['precast']} modules" if fast["precast"] else "fp32 weights"
    layout = f"decoder {fast['layout']}, {weights}, {'compiled' if fast['compile'] else 'eager'}"
    scene = f" ({args.scene_side} x {args.scene_side} adjacent)" if args.mosaic else ""
    print(f"{p.variant}, random init, {p.img_size} px, {p.timesteps} diffusion steps, {r['tiles']} synthetic "
          f"tiles{scene}, device {r['device']}, {r['threads']} threads, {layout}, precision {p.precision}; "
          f"model built in {r['build_s']:.1f} s")  # fmt: skip
    print(f"{'path':<28}{'tiles/s':>10}{'s/tile':>10}")
    print(f"{'batched (batch ' + str(p.batch_size) + ')':<28}{r['batched_tps']:>10.3f}{1 / r['batched_tps']:>10.2f}")
    print(f"{'naive per-tile loop':<28}{r['naive_tps']:>10.3f}{1 / r['naive_tps']:>10.2f}")
    if args.mosaic:
        name = f"mosaic (batch {p.batch_size} windows)"
        print(f"{name:<28}{r['mosaic_tps']:>10.3f}{1 / r['mosaic_tps']:>10.2f}")
    if args.baseline:
        before = r["before_tps"]
        print(f"{'batched, before fast path':<28}{before:>10.3f}{1 / before:>10.2f}")
        v = r["vs_before"]
        same = "identical DN" if v["identical"] else f"PSNR {v['psnr']:.1f} dB, SAM {v['sam_deg']:.2f} deg"
        print(f"fast path vs before (autocast casting weights per call, NCHW, eager): tiles/s "
              f"{r['batched_tps'] / before:.2f}x, opt_v1 {same}")  # fmt: skip
    if r["compile_s"]:
        c = r["compile_s"]
        gain = 1 / r["before_tps"] - 1 / r["batched_tps"] if args.baseline else 0.0
        pays = f"pays for itself after {c['cold'] / gain:.0f} batched tiles" if gain > 0 else "no gain to pay it back"
        print(f"compile (stage1.compile): {c['cold']:.0f} s over this run's batch shapes (cold cache), "
              f"{c['warm']:.0f} s again for one shape from inductor's cache; once per process: {pays}")  # fmt: skip
    ratio = r["batched_tps"] / r["naive_tps"]
    print(f"batched / naive: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    print(f"FLOPs (FlopCounterMode, one batch of {p.batch_size}): {r['flops_per_tile'] / giga:.1f} GFLOP per tile")
    peak, n = r["peaks"][p.precision]
    names = {"32": "fp32", "bf16": "bf16", "16": "fp16"}
    name = names[p.precision]
    peaks = [f"{names[k]} {v / giga:.1f} GFLOP/s ({size}^2)" for k, (v, size) in r["peaks"].items()]
    print("matmul peak (best large torch.matmul): " + ", ".join(peaks))
    print(f"batched path achieves {r['achieved'] / giga:.1f} GFLOP/s = {100 * r['achieved'] / peak:.0f} % of the "
          f"{name} matmul peak (target >= 50 %: {'met' if r['achieved'] >= peak / 2 else 'NOT met'})")  # fmt: skip
    # The roofline bound: the same FLOPs at 100 % of the peak is the fastest any batching could make it.
    print(f"naive loop achieves {r['naive_achieved'] / giga:.1f} GFLOP/s = {100 * r['naive_achieved'] / peak:.0f} % "
          f"of that peak: at 100 % the batched path would be {peak / r['naive_achieved']:.2f}x the naive loop, "
          f"the most batching can give in {name} on this machine")  # fmt: skip
    for path, parts in r["parts"].items():
        decoder = 100 * parts["decoder"] / parts["total"]
        print(f"time split, {path}: TerraMind sampler {parts['sampler'] / r['tiles']:.2f} s/tile, diffusion decoder "
              f"{parts['decoder'] / r['tiles']:.2f} s/tile ({decoder:.0f} % of the time)")  # fmt: skip
    if args.mosaic:
        flops, speed = r["mosaic_flops_per_tile"] / r["flops_per_tile"], r["mosaic_tps"] / r["batched_tps"]
        print(f"FLOPs (FlopCounterMode, the whole scene): mosaic {r['mosaic_flops_per_tile'] / giga:.1f} GFLOP per "
              f"tile; mosaic vs naive loop: tiles/s {r['mosaic_tps'] / r['naive_tps']:.2f}x")  # fmt: skip
        print(f"mosaic vs per-tile at {p.img_size} px: FLOPs per tile {flops:.2f}x, tiles/s {speed:.2f}x")
    print(f"torch.profiler, one batched pass, by operator (self time):\n{r['profile']}")
    q = r["quality"]
    if q:
        print(f"bf16 vs fp32 opt_v1 (batch of {p.batch_size}, same weights and seeds, uint16 DN): PSNR "
              f"{q['psnr']:.1f} dB, SAM {q['sam_deg']:.2f} deg")  # fmt: skip
    print(last_line(r, args.mosaic))
    return 0


def last_line(r: dict, mosaic: bool) -> str:
    """``stage1 <device>: <precision> <s> s/tile with mosaic, batched <P> % of the <precision> matmul peak, bf16 vs
    fp32 PSNR <q> dB`` from :func:`run`'s result (``batched`` for the s/tile without ``--mosaic``)."""
    name = {"32": "fp32", "bf16": "bf16", "16": "fp16"}[r["p"].precision]
    per_tile = 1 / (r["mosaic_tps"] if mosaic else r["batched_tps"])
    share = 100 * r["achieved"] / r["peaks"][r["p"].precision][0]
    psnr = f"{r['quality']['psnr']:.1f} dB" if r["quality"] else "n/a (no native bf16)"
    return (f"stage1 {r['device'].type}: {name} {per_tile:.2f} s/tile {'with mosaic' if mosaic else 'batched'}, "
            f"batched {share:.0f} % of the {name} matmul peak, bf16 vs fp32 PSNR {psnr}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
