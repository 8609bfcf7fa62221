"""Stage 1: generate opt_v1 for every catalog tile with TerraMind (S1GRD → S2L2A), resumably and sharded.

The opt_v1 cache is a :class:`~gac.io.store.ShardStore` with one array, ``opt`` ``(N, 12, 120, 120) uint16`` (S2L2A DN),
(with ``stage1.samples: K > 1`` the mean of ``K`` diffusion draws, and ``sigma``, their spread: :func:`spread`)
and the catalog's per-tile metadata (CRS, transform, split, …) in its index, so Stage 2/3 and the GeoTIFF export read it
without going back to the catalog.

The cache is written by :func:`gac.inference.engine.run` (sharded, resumable after a kill, ``torchrun`` ranks, per-batch
seeding, bad tiles recorded). What is Stage 1's own: the TerraMind generator
(:func:`gac.models.terramind.build_generator`), the exact pad/crop geometry around it (:func:`generate`), or with
``stage1.mosaic: true`` the scenes of adjacent tiles generated in blended windows (:func:`generate_scenes`,
:mod:`gac.inference.mosaic`; a scene is never split across batches, shards or ranks), and the ``stage1.json``
fingerprint
(:func:`fingerprint`) of everything that determines opt_v1 (model, weights, timesteps, size, seed, shard and batch
size, mosaic, catalog tiles). Bit for bit only at the same intra-op thread count per process
(``torchrun`` gives each rank ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gac.config import Stage1Params
from gac.errors import GacError
from gac.inference import engine, fastpath, mosaic
from gac.inference.engine import autocast, check_precision, native_bf16, plan, resolve_device, seed_batch, to_dn  # noqa: F401
from gac.io import fingerprint as fingerprints
from gac.io.store import ShardStore
from gac.models import geometry
from gac.models.terramind import build_generator
from gac.pipeline import StageName as S

CONFIG_FILE = "stage1.json"
DN_MAX = engine.DN_MAX
#: What :func:`run` returns (the engine's report: processed, generated, skipped, errors, timings).
Stage1Report = engine.Report
_dist = engine.dist


def _forward(model: torch.nn.Module, x: torch.Tensor, p: Stage1Params, device: torch.device) -> torch.Tensor:
    """TerraMind on model-size S1 dB (B, 2, img_size, img_size) → S2L2A DN float32 on ``device``."""
    with torch.inference_mode(), autocast(device, p.precision):
        out = model({"S1GRD": x.to(device, non_blocking=True)}, timesteps=p.timesteps)["S2L2A"]
    return out.float()


def generate(model: torch.nn.Module, s1_db: torch.Tensor, p: Stage1Params, device: torch.device) -> torch.Tensor:
    """Generate S2L2A DN (B, 12, 120, 120) float32 for S1 dB (B, 2, 120, 120), exactly aligned with the input."""
    x = geometry.pad_to(s1_db.to(device, non_blocking=True), p.img_size)
    return geometry.crop_from(_forward(model, x, p, device), s1_db.shape[-1]).cpu()


def generate_scenes(
    model: torch.nn.Module,
    s1_db: torch.Tensor,
    places: list[mosaic.Place],
    p: Stage1Params,
    device: torch.device,
) -> torch.Tensor:
    """:func:`generate` over scenes: the tiles of each complete scene as one mosaic in blended windows of
    ``img_size`` (:func:`gac.inference.mosaic.generate`, ``batch_size`` windows per model call); a one-tile scene gives
    exactly :func:`generate`'s result."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _forward(model, x, p, device)

    return mosaic.generate(forward, s1_db.to(device, non_blocking=True), places, p.img_size, p.batch_size).cpu()


def spread(draws: torch.Tensor) -> dict[str, torch.Tensor]:
    """``K`` draws ``(K, B, 12, H, W)`` DN → ``{"opt": their mean, "sigma": their standard deviation}``.

    The generator is stochastic (sampled tokens, diffusion noise): where its draws disagree, the SAR did not pin the
    optical down — TerraMind's own uncertainty, which no single draw shows. The mean is the point estimate whose
    error that spread describes (a single draw's error would have twice its variance), hence ``opt`` is the mean, not
    draw 0; the spread uses ``K − 1`` (unbiased variance). Draw ``k`` continues the batch's seeded RNG stream, so the
    cache is as reproducible as a one-draw cache.
    """
    return {"opt": draws.mean(0), "sigma": draws.std(0, correction=1)}


def fingerprint(p: Stage1Params, catalog_ids: list[str], device: torch.device | None = None) -> dict:
    """Everything that determines opt_v1 on ``device`` (its fast path: :func:`gac.inference.fastpath.fingerprint_keys`);
    a cache written under another fingerprint is not resumed."""

    def file_sha(path: str) -> str:
        return fingerprints.file_digest(path) if Path(path).is_file() else "?"

    weights = "random"
    if p.ckpt_path:
        weights = file_sha(p.ckpt_path)
    elif p.pretrained:
        weights = "hub"
    if p.tokenizer_ckpt_path:
        weights += f"+tokenizer:{file_sha(p.tokenizer_ckpt_path)}"
    keys = ("variant", "timesteps", "img_size", "seed", "shard_size", "batch_size", "precision", "mosaic")
    ident = {k: getattr(p, k) for k in keys} | {"weights": weights}
    if p.samples > 1:  # only then: a one-draw cache written before ``samples`` existed stays valid (no 28 h redo)
        ident["samples"] = p.samples
    ident |= fastpath.fingerprint_keys(p, device or resolve_device(p.device))
    ident["tiles"] = fingerprints.ids_digest(catalog_ids)
    return ident


def run(
    p: Stage1Params, catalog_root: str, model: torch.nn.Module | None = None, progress: bool = True
) -> Stage1Report:
    """Generate the missing shards of opt_v1 for this rank (see :func:`gac.inference.engine.run`); rank 0 finalises
    the index."""
    device = resolve_device(p.device)
    p = p.model_copy(update={"precision": engine.resolve_precision(device, p.precision)[0]})
    check_precision(device, p.precision)
    index = ShardStore(catalog_root).index
    if p.max_tiles is not None:
        index = index.head(p.max_tiles)
    if index.empty:
        raise GacError(f"{catalog_root}: the catalog has no tiles (run the catalog stage first)")

    def build() -> torch.nn.Module:
        torch.manual_seed(p.seed)
        model = build_generator(p).to(device)
        fastpath.prepare(model, p, device)
        return model

    stamp = fingerprint(p, list(index["patch_id"]), device)
    places: dict[str, mosaic.Place] = {}
    if p.mosaic:  # scenes contiguous, in the order of their first tile: the engine keeps each in one batch and shard
        index, places = mosaic.scenes(index)

    def draw(m: torch.nn.Module, s1: torch.Tensor, ids: list[str]) -> torch.Tensor:
        if p.mosaic:
            return generate_scenes(m, s1, [places[i] for i in ids], p, device)
        return generate(m, s1, p, device)

    def step(m: torch.nn.Module, s1: torch.Tensor, _opt: None, ids: list[str]) -> torch.Tensor | dict:
        if p.samples == 1:
            return draw(m, s1, ids)
        return spread(torch.stack([draw(m, s1, ids) for _ in range(p.samples)]))

    return engine.run(
        out=p.out,
        stamp=stamp,
        catalog_root=catalog_root,
        index=index,
        step=step,
        model=model if model is not None else build,  # a model given is run as it is
        shard_size=p.shard_size,
        batch_size=p.batch_size,
        device=device,
        num_workers=p.num_workers,
        seed=p.seed,
        config_file=CONFIG_FILE,
        progress=progress,
        label=S.STAGE1,
        group=mosaic.SCENE if p.mosaic else None,
    )
