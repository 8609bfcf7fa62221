"""Stage 1's generator put on its hardware: weights cast once, the decoder's memory layout, ``torch.compile``.

Why: Stage 1 is the pipeline's dominant cost (the seed budgets 28 GPU-hours for BigEarthNet v2's 199,762 tiles), and
TerraMind's diffusion decoder — a UNet of convolutions run ``timesteps`` times per tile — takes 80–94 % of it. On a
CPU with native bf16, what stands between autocast and the machine's bf16 matmul peak is, in the order
``torch.profiler`` ranks it (``benchmarks/stage1_throughput.py`` prints the table):

* **Per-call weight casts.** Autocast casts every convolution and linear weight from fp32 to bf16 on every call:
  ~230 convolutions per diffusion step, plus the sampler's linears once per generated token. Casting them once
  (:func:`precast`) gives the same bf16 weights (the same round-to-nearest-even) and so the same opt_v1, bit for bit,
  without the copies.
* **Layout.** oneDNN's AMX convolution kernels work on channels-last/blocked data and reorder NCHW tensors on every
  call; on a 2-core AMX Xeon channels-last took the bf16 decoder from 2.47 to 2.14 s/tile, on an AVX512-BF16 CPU
  without AMX it was 2 % slower. :func:`layout` picks channels-last where the CPU has AMX and the precision is bf16.
* **What lies between the convolutions.** TerraTorch's ``GroupNorm32`` runs in fp32 (a cast to float and back around
  each of the UNet's ~150 norms), then SiLU and residual adds: memory-bound passes that autocast cannot fuse.
  ``stage1.compile: true`` compiles the decoder with inductor and frozen weights: the norm, its casts and SiLU become
  one loop, and the convolution weights are prepacked for oneDNN once. Its cost is one compile per process and batch
  shape (inductor caches it on disk under ``TORCHINDUCTOR_CACHE_DIR``); the benchmark counts it.

fp32 without compile is untouched: its opt_v1 is the one every earlier cache holds. What changes numerics (a layout,
a compiled decoder) is in the cache's fingerprint (:func:`fingerprint_keys`), so a resume never mixes two kinds.
"""

from __future__ import annotations

import torch

from gac.config import Stage1Params

#: The modules autocast casts to the reduced dtype on every call (``torch.amp``'s lower-precision op list).
CAST_ON_CALL = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
#: Where TerraMind's generation model keeps its tokenizers (the S2L2A one holds the diffusion decoder).
TOKENIZERS = "tokenizer"


def reduced_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes in at ``precision`` (``None`` for fp32)."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)


def layout(device: torch.device, precision: str) -> str:
    """``channels_last`` for the decoder where oneDNN's AMX kernels run it (a CPU with AMX, bf16), else
    ``contiguous`` (NCHW, what TerraTorch builds)."""
    amx = device.type == "cpu" and torch.cpu._is_amx_tile_supported()
    return "channels_last" if amx and precision == "bf16" else "contiguous"


def decoders(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The diffusion decoders of a TerraMind generation model (one per output image modality)."""
    return [tok.decoder for tok in getattr(model, TOKENIZERS).values() if hasattr(tok, "decoder")]


def precast(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast, in place, the weights and biases autocast would cast on every call; returns how many modules."""
    modules = [m for m in model.modules() if isinstance(m, CAST_ON_CALL)]
    for m in modules:
        m.to(dtype)
    return len(modules)


def prepare(model: torch.nn.Module, p: Stage1Params, device: torch.device) -> dict[str, object]:
    """Put ``model`` (already on ``device``) on the fast path for ``p.precision`` (resolved) and ``p.compile``, in
    place; returns what was done, for the provenance."""
    done: dict[str, object] = {"layout": layout(device, p.precision), "compile": p.compile, "precast": 0}
    dtype = reduced_dtype(p.precision)
    if dtype is not None:
        done["precast"] = precast(model, dtype)
    for decoder in decoders(model):
        if done["layout"] == "channels_last":
            decoder.to(memory_format=torch.channels_last)
        if p.compile:
            compile_decoder(decoder, p.batch_size)
    return done


def compile_decoder(decoder: torch.nn.Module, batch_size: int) -> None:
    """``torch.compile`` the decoder in place with inductor and frozen weights (it only ever runs under
    ``inference_mode``), one static graph per batch shape.

    Static, because a batch is at most ``batch_size`` tiles or windows and the shapes repeat: each is compiled once per
    process (from inductor's disk cache after the first), where a dynamic batch dimension would give up the
    shape-specialised convolution kernels for every call. The recompile limit is raised to cover them all.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, batch_size + 1)
    decoder.compile(dynamic=False, options={"freezing": True})


def fingerprint_keys(p: Stage1Params, device: torch.device) -> dict[str, object]:
    """What the fast path adds to Stage 1's fingerprint: only what changes opt_v1's numbers, and only when it is on,
    so that a cache written before it existed still resumes."""
    keys: dict[str, object] = {}
    if layout(device, p.precision) != "contiguous":
        keys["layout"] = layout(device, p.precision)
    if p.compile:
        keys["compile"] = True
    return keys
