"""Stage 1's fast path (:mod:`gac.inference.fastpath`) gives the opt_v1 it gave before, or within the stated bf16
difference where it changes the kernels: weights cast once (bit for bit what autocast computes), fp32 untouched (bit
for bit), the decoder's layout chosen by the CPU, a compiled decoder (within the bf16 bound of fp32; within fp32's own
rounding in fp32), and the fingerprint that keeps a resume from mixing them.

The generator is the seeded random-init ``terramind_v1_tiny_generate`` with the decoder's zero-initialised layers
woken (else every tile is the per-band mean and any two paths agree trivially), at 128 px and one diffusion step.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from gac.config import Stage1Params
from gac.evaluation import metrics
from gac.inference import engine, fastpath
from gac.inference import generate as stage1

CPU = torch.device("cpu")
P = Stage1Params(timesteps=1, img_size=128, batch_size=2, device="cpu", seed=0)
NATIVE_BF16 = engine.native_bf16(CPU)
#: The bf16 difference the README states: opt_v1 in bf16 against fp32, both as uint16 DN, stays above this PSNR.
BF16_PSNR_DB = 45.0
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="no AVX512-BF16/AMX: bf16 is emulated ~150x slower here")


@pytest.fixture(scope="module")
def generator() -> torch.nn.Module:
    from gac.models.terramind import build_generator

    torch.manual_seed(P.seed)
    model = build_generator(P)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1 and not weight.any():
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return model


@pytest.fixture(scope="module")
def s1() -> torch.Tensor:
    return torch.randn(2, 2, 120, 120, generator=torch.Generator().manual_seed(3)) * 4 - 14


def opt_v1(model: torch.nn.Module, s1: torch.Tensor, precision: str) -> torch.Tensor:
    stage1.seed_batch(P.seed, "fastpath", 0)
    return torch.from_numpy(stage1.to_dn(stage1.generate(model, s1, P.model_copy(update={"precision": precision}),
                                                         CPU).numpy()).astype(np.float32))  # fmt: skip


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    return metrics.psnr(metrics.to_reflectance(a), metrics.to_reflectance(b)).mean().item()


def test_fp32_is_left_as_built(generator: torch.nn.Module, s1: torch.Tensor) -> None:
    """fp32 without compile: no cast, NCHW, eager — the opt_v1 of every earlier cache, bit for bit."""
    model = copy.deepcopy(generator)
    done = fastpath.prepare(model, P, CPU)
    assert done == {"layout": "contiguous", "compile": False, "precast": 0}
    assert {w.dtype for w in model.parameters()} == {torch.float32}
    assert torch.equal(opt_v1(model, s1, "32"), opt_v1(generator, s1, "32"))


@needs_bf16
def test_weights_cast_once_give_exactly_what_autocast_gives(generator: torch.nn.Module, s1: torch.Tensor) -> None:
    """Every convolution and linear weight cast to bf16 once: the same DN as autocast casting them on every call
    (sampler and decoder), and the casts are gone (no fp32 weight is left in a module autocast would cast)."""
    model = copy.deepcopy(generator)
    n = fastpath.precast(model, torch.bfloat16)
    assert n > 100
    cast = [m for m in model.modules() if isinstance(m, fastpath.CAST_ON_CALL)]
    assert len(cast) == n and {w.dtype for m in cast for w in m.parameters()} == {torch.bfloat16}
    before, after = opt_v1(generator, s1, "bf16"), opt_v1(model, s1, "bf16")
    assert torch.equal(after, before)
    assert psnr_db(after, opt_v1(generator, s1, "32")) < metrics.PSNR_MAX_DB  # bf16 really ran


@needs_bf16
def test_the_bf16_fast_path_stays_within_the_stated_bf16_difference(
    generator: torch.nn.Module, s1: torch.Tensor
) -> None:
    """What ``gac stage1`` runs in bf16 on this CPU (layout by the CPU, weights cast once) against fp32 as built."""
    model = copy.deepcopy(generator)
    done = fastpath.prepare(model, P.model_copy(update={"precision": "bf16"}), CPU)
    assert done["layout"] == ("channels_last" if torch.cpu._is_amx_tile_supported() else "contiguous")
    assert BF16_PSNR_DB < psnr_db(opt_v1(model, s1, "bf16"), opt_v1(generator, s1, "32")) < metrics.PSNR_MAX_DB


def test_the_layout_follows_the_hardware() -> None:
    """channels-last only where oneDNN runs the bf16 decoder on AMX (measured faster there, slower without it)."""
    amx = torch.cpu._is_amx_tile_supported()
    assert fastpath.layout(CPU, "bf16") == ("channels_last" if amx else "contiguous")
    assert fastpath.layout(CPU, "32") == "contiguous"
    assert fastpath.layout(torch.device("meta"), "bf16") == "contiguous"


def test_what_changes_opt_v1_is_in_the_fingerprint_and_nothing_else() -> None:
    """A cache made without the fast path's options keeps its fingerprint (resumes); compile, or a channels-last
    decoder, make another cache (never mixed into one)."""
    plain = stage1.fingerprint(P, ["a"], CPU)
    assert plain == stage1.fingerprint(P, ["a"], CPU) and "compile" not in plain and "layout" not in plain
    assert stage1.fingerprint(P.model_copy(update={"compile": True}), ["a"], CPU)["compile"] is True
    amx = torch.cpu._is_amx_tile_supported()
    assert ("layout" in stage1.fingerprint(P.model_copy(update={"precision": "bf16"}), ["a"], CPU)) == amx


def test_compile_is_set_on_the_generators_decoders_and_only_there(generator: torch.nn.Module) -> None:
    """``stage1.compile: true`` compiles each diffusion decoder in place (lazily: the compile runs at the first call of
    each batch shape); the sampler stays eager."""
    model = copy.deepcopy(generator)
    done = fastpath.prepare(model, P.model_copy(update={"compile": True}), CPU)
    decoders = fastpath.decoders(model)
    assert done["compile"] and decoders and all(d._compiled_call_impl is not None for d in decoders)
    assert model.sampler._compiled_call_impl is None
    assert torch._dynamo.config.recompile_limit >= P.batch_size + 1


def small_decoder() -> torch.nn.Module:
    """TerraTorch's diffusion decoder class (``PatchedUNetCondCat``: the blocks, norms, attention and patching of
    TerraMind's) at a twentieth of the released one's size: inductor compiles it in seconds, the released one in
    60–100 s on two cores (that one is measured by ``benchmarks/stage1_throughput.py --compile``)."""
    from terratorch.models.backbones.terramind.tokenizer.models.unet.unet import PatchedUNetCondCat

    torch.manual_seed(0)
    size = {"model_channels": 32, "num_res_blocks": 1, "attention_resolutions": [2], "channel_mult": (1, 2)}
    decoder = PatchedUNetCondCat(in_channels=12, out_channels=12, cond_channels=5, patch_size=4, image_size=64, **size)
    with torch.no_grad():
        for weight in decoder.parameters():
            if weight.dim() > 1 and not weight.any():
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return decoder.eval()


def test_a_compiled_decoder_computes_what_the_eager_one_does_within_its_precision() -> None:
    """:func:`gac.inference.fastpath.compile_decoder` (inductor, frozen weights) on TerraTorch's decoder class, in the
    precision ``auto`` picks here. bf16: no further from fp32 eager than autocast's eager bf16 is (25 % slack for the
    other summation order), and within a few roundings of bf16's 8-bit mantissa (4 x 2**-8 relative); fp32: within
    fp32's rounding (the fused kernels sum in another order: 1e-4 relative)."""
    precision = engine.resolve_precision(CPU, "auto")[0]
    eager, compiled = small_decoder(), small_decoder()
    dtype = fastpath.reduced_dtype(precision)
    if dtype is not None:
        fastpath.precast(compiled, dtype)
    fastpath.compile_decoder(compiled, batch_size=2)
    g = torch.Generator().manual_seed(4)
    x, cond, t = torch.randn(2, 12, 64, 64, generator=g), torch.randn(2, 5, 4, 4, generator=g), torch.tensor(500)
    with torch.inference_mode():
        want = eager(x, t, cond)
        with engine.autocast(CPU, precision):
            got, autocast = compiled(x, t, cond).float(), eager(x, t, cond).float()
    assert compiled._compiled_call_impl is not None and want.abs().mean() > 0.1

    def rel(a: torch.Tensor) -> float:
        return ((a - want).norm() / want.norm()).item()

    if precision == "bf16":
        assert 0 < rel(got) < min(1.25 * rel(autocast), 4 * 2**-8), (rel(got), rel(autocast))
    else:
        assert rel(got) < 1e-4, rel(got)
