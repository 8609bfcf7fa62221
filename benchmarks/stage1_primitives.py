"""Benchmark: where TerraMind's diffusion decoder spends its bf16 time on a CPU, by oneDNN primitive, per fast path.

Why: on a CPU the decoder's convolutions run in oneDNN; what is *not* in them (GroupNorm in fp32 with its casts, SiLU,
adds, autocast's weight copies, layout reorders) does not get faster when the convolutions do (AMX multiplies bf16
~6x faster than AVX512-BF16, the memory-bound passes not at all). This script runs the S2L2A tokenizer's decoder alone
(random init: the same kernels and shapes as the released weights) under ``ONEDNN_VERBOSE`` for each step of
:mod:`gac.inference.fastpath` and prints, side by side, the wall time, the time inside oneDNN's convolutions (and which
kernels: ``jit_bf16`` are the NCHW ones, ``brg_conv`` the brgemm family that oneDNN runs on AMX), the reorders, and
what is left outside oneDNN. Each mode runs in its own process (oneDNN caches kernels per process).

Usage::

    python benchmarks/stage1_primitives.py                 # 4 windows of 224 px, 2 steps: autocast, cast+NCHW,
                                                           # cast+channels-last, cast+compiled
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time

MODES = ("autocast", "cast", "cast_channels_last", "cast_compiled")


def one(mode: str, batch: int, steps: int) -> None:
    """Run the decoder in ``mode`` twice (warm-up, kernel choice, compile), then once under ONEDNN_VERBOSE."""
    import torch

    from gac.inference import fastpath
    from gac.models.backend import import_terratorch

    import_terratorch()
    from terratorch.registry import FULL_MODEL_REGISTRY

    torch.manual_seed(0)
    tok = FULL_MODEL_REGISTRY.build("terramind_v1_tokenizer_s2l2a").eval()
    tokens = torch.randint(0, 15360, (batch, 14, 14), generator=torch.Generator().manual_seed(1))
    if mode != "autocast":
        fastpath.precast(tok, torch.bfloat16)
    if mode == "cast_channels_last":
        tok.decoder.to(memory_format=torch.channels_last)
    if mode == "cast_compiled":
        fastpath.compile_decoder(tok.decoder, batch)

    def run() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            tok.decode_tokens(tokens, image_size=(224, 224), timesteps=steps, verbose=False)

    run()
    run()
    start = time.perf_counter()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        run()
    print(f"WALL {time.perf_counter() - start:.4f}", flush=True)


def parse(text: str) -> dict:
    """Seconds by (primitive kind, implementation) from oneDNN's ``exec`` lines, and the wall time."""
    spent: collections.Counter = collections.Counter()
    wall = float("nan")
    for line in text.splitlines():
        if line.startswith("WALL "):
            wall = float(line.split()[1])
        fields = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in fields:
            i = fields.index("exec")
            spent[(fields[i + 2], fields[i + 3])] += float(fields[-1]) / 1000
    return {"wall": wall, "spent": spent}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="224 px windows per call (%(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="diffusion steps (%(default)s)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in this process
    args = parser.parse_args(argv)
    if args.mode:
        one(args.mode, args.batch, args.steps)
        return 0
    print(f"S2L2A decoder, {args.batch} windows of 224 px, {args.steps} steps, bf16; seconds")
    print(f"{'mode':<20}{'wall':>7}{'conv':>7}{'reorder':>8}{'outside':>8}  convolution kernels")
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--batch", str(args.batch), "--steps", str(args.steps)]
        r = parse(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        conv = sum(v for (kind, _), v in r["spent"].items() if kind == "convolution")
        reorder = sum(v for (kind, _), v in r["spent"].items() if kind == "reorder")
        kernels = ", ".join(sorted({impl for kind, impl in r["spent"] if kind == "convolution"}))
        outside = r["wall"] - sum(r["spent"].values())
        print(f"{mode:<20}{r['wall']:>7.2f}{conv:>7.2f}{reorder:>8.2f}{outside:>8.2f}  {kernels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
