"""Learning, shown: Stage 2 and Stage 3, trained through their real entry points, improve tiles they never saw.

The other training tests check *machinery* (checkpoints, resume, registry, DDP) over a few steps, where a training
path that silently learns nothing — a loss that reaches no trainable parameter, an optimiser without the head, a head
stuck at its zero init, a cache written from the untrained model — still passes. These two tests fail on any of those:

* **Data with a known, learnable answer.** 48 physically modelled synthetic tiles (:mod:`gac.data.synthetic`, 16 per
  split) are catalogued. Each stage's input cache (opt_v1 for Stage 2, opt_v2 for Stage 3) is the *real* S2 degraded
  in a way a refiner can undo: a Gaussian blur (σ = 1.5 px, which also removes edges the SAR still shows) and a fixed
  per-band colour shift (gain 0.75–1.25, offset ±400 DN), written as uint16 DN in the project's cache format
  (:class:`gac.io.store.ShardStore`, key ``opt``, the catalog's index rows). The input scores 29.0–30.9 dB on the
  held-out tiles: the identity, which both stages are at initialisation, is far from passing.
* **The real entry point.** ``gac stage2`` / ``gac stage3`` exactly as the DVC stages call them (:func:`gac.cli.main`,
  which ``pipelines/stage2.py``/``stage3.py`` run), with a params file that only shrinks the budget (tiny random-init
  backbones, ``img_size`` 128, batch 4, 2 epochs = 8 optimizer steps, lr 2e-3, the stages' own loss weights):
  Lightning fit, checkpoint selection, the exported model, and the next cache written by :mod:`gac.inference.refine`.
* **Noise of known σ.** The targets the stages train (and are calibrated) on carry
  :func:`gac.data.synthetic.heteroscedastic_noise`: fresh Gaussian draws no input can predict, whose σ (1–20 % of a
  band's smoothed level, growing with the smoothed NIR) the input does show. Every run trains a σ head
  (``nll_weight`` :data:`NLL_WEIGHT`), which sees the mean path's features detached. The learning checks below score
  the mean against the *clean* S2 (the truth the noise hides); :func:`sigma_check` scores the cached ``sigma`` of the
  held-out tiles: Spearman with the known σ (per band over pixels, mean over bands) ≥ 0.6 and the calibrated central
  95 % interval covering 90–99 % of the noisy targets (:data:`SIGMA_BAR`, the issue's bar).
* **Held-out tiles.** Training sees the ``train`` split only (checked through the task's seen-tiles audit) and the
  checkpoint is chosen on ``validation``; the assertions read the written cache (opt_v2 / opt_v3) for the ``test``
  split only and compare it with its input through :func:`gac.evaluation.metrics.per_tile` (:func:`learning_check`):
  mean PSNR must rise by at least half of what the stage measured below (:data:`BARS`: 3.8 dB for Stage 2, 1.8 dB
  for Stage 3), *every* held-out tile must gain at least half of the smallest per-tile gain measured (2.9 dB, 1.4 dB),
  and mean SSIM must not fall. As in every stage, tiles flagged snowy or cloudy (``data.exclude``) are neither
  trained on nor scored (here 1 train, 2 validation and 1 test tile, all snowy: 15 held-out tiles are scored).
* **A control that cannot learn.** The same Stage 2 run with lr 1e-9 (same data, steps, seed and check) must *fail*
  the check, and the σ check too (its σ head is still constant per band): what passes is the training, not the data
  or the cache plumbing. It runs the real test's 2 epochs, the
  fewest that pass the bar (1 epoch at lr 2e-3 gains 3.74 dB, per tile ≥ 2.67: short of it).

Measured on 2 shared CPU cores (``pytest -s`` prints them; a Stage 2 run takes 15–90 s there and Stage 3 30–130 s, with
the others' load; back to back, this module took 72.7 s before the σ checks and 80.6 s with them), mean scored against
the clean S2: Stage 2 30.93 → 38.22 dB (+7.30; per tile +5.60 … +9.88), SSIM 0.906 → 0.970; Stage 3 29.02 → 32.73 dB
(+3.72; per tile +2.98 … +4.52), SSIM 0.943 → 0.953, SAR-edge 0.185 → 0.077; the lr 1e-9 control +0.00 dB on every tile.
The same Stage 2 run with ``nll_weight`` 0 gives the very same 30.93 → 38.22 dB (the σ head cannot touch the mean).
Before the targets carried noise (clean targets, no σ head) the same runs gained +7.72 dB (Stage 2) and +3.63 dB (Stage
3). Most of the gain is the colour shift undone (a perfect colour correction without any deblurring would score ≈ 43
dB). Stage 3 gains less in this budget because its SAR-edge term pulls towards edges first: without it and the cycle
term the same run gains 7.0 dB instead of 3.4 (snowy tile scored; without the cycle term alone: unchanged).

σ on the held-out tiles (DN; UCE in DN²; :mod:`gac.evaluation.uncertainty`'s definitions): Stage 2 Spearman with the
known σ 0.908, coverage 0.741 (68 %) and 0.937 (95 %), UCE 3 646, Spearman(|error|, σ) 0.249 per pixel and 0.771 per
tile, sharpness 235 DN; Stage 3 0.853, 0.743 and 0.943, UCE 12 395, 0.117 and 0.761, 268 DN; the lr 1e-9 control
Spearman 0.000 (σ constant per band; its calibrated coverage, 0.959, alone would pass). Coverage 68 % above 0.68
with 95 % below 0.95: the errors are heavier tailed than a Gaussian (the mean's own deblurring errors at edges add to
the noise).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from gac.config import (
    CacheParams,
    CatalogParams,
    DataParams,
    MlflowParams,
    Params,
    Stage1Params,
    Stage2Params,
    Stage3Params,
)
from gac.config import TrainParams as Train
from gac.data.metadata import keep_unflagged
from gac.evaluation import metrics
from gac.io.store import ShardStore

N_TILES = 48
#: Quality flags whose tiles are neither trained on nor scored (the default ``data.exclude``: cloud, seasonal snow).
EXCLUDE = DataParams().exclude
#: A small but honest budget: ≈ 16 train tiles, batch 4 → 4 steps per epoch, 2 epochs, validated once per epoch.
TRAIN = Train(
    batch_size=4,
    epochs=2,
    lr=2e-3,
    warmup_steps=0,
    val_every_n_steps=1.0,
    save_every_n_steps=1.0,
    early_stopping=False,
    accelerator="cpu",
    seed=0,
)
CACHE = CacheParams(device="cpu", batch_size=8, shard_size=16)
BLUR_SIGMA_PX = 1.5
#: The control's learning rate: with it the same run cannot move its weights measurably, so it must fail the check.
NO_LEARNING_LR = 1e-9
#: ``stage2/3.nll_weight`` of every run here: the σ heads train beside the mean (which they cannot change).
NLL_WEIGHT = 0.05
#: Seed of the known noise in the targets (:func:`gac.data.synthetic.heteroscedastic_noise`).
NOISE_SEED = 7


@dataclass(frozen=True)
class SigmaBar:
    """What "σ learnt" means on the held-out tiles (the issue's bar): the predicted σ ranks pixels as the known σ
    does (Spearman per band over pixels, mean over bands) and the calibrated central 95 % interval holds 90–99 % of
    the noisy targets."""

    spearman: float = 0.6
    coverage95: tuple[float, float] = (0.90, 0.99)


SIGMA_BAR = SigmaBar()


@dataclass(frozen=True)
class Bar:
    """What "learnt" means for a stage: held-out PSNR gains at least ``mean_db`` on average and ``tile_db`` on every
    tile (each about half of what the stage measured, see the module docstring)."""

    mean_db: float
    tile_db: float


BARS = {"stage2": Bar(mean_db=3.8, tile_db=2.9), "stage3": Bar(mean_db=1.8, tile_db=1.4)}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 synthetic tiles catalogued into train, validation and test (16 each)."""
    from gac.data.catalog import build
    from gac.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("learning")
    generate(tmp / "tiles", n_tiles=N_TILES, seed=12)
    out = tmp / "catalog"
    build(CatalogParams(out=str(out), splits=["train", "validation", "test"], workers=0), tmp / "tiles", progress=False)
    splits = ShardStore(out).index["split"].value_counts().to_dict()
    assert splits == {"train": 16, "validation": 16, "test": 16}, splits
    return out


@dataclass(frozen=True)
class NoisyWorld:
    """The catalog the stages train on (``catalog``: its S2 carries noise of known σ) and that σ (DN, in the clean
    catalog's index order)."""

    catalog: Path
    sigma: np.ndarray


@pytest.fixture(scope="module")
def noisy(catalog: Path) -> NoisyWorld:
    """The catalog with :func:`gac.data.synthetic.heteroscedastic_noise` in every S2 (S1 and the index as they are):
    what the stages train and are calibrated on. The learning checks still score against the clean catalog, the
    truth the noise hides; the σ checks score against the noisy S2, the observation σ describes."""
    import pandas as pd

    from gac.data.synthetic import heteroscedastic_noise
    from gac.io.store import INDEX, SHARDS

    cat = ShardStore(catalog)
    noisy_s2, sigma = heteroscedastic_noise(cat.read("s2"), NOISE_SEED)
    out = ShardStore(catalog.parent / "noisy_catalog")
    for name in cat.shard_names():
        at = np.flatnonzero(cat.index["shard"].to_numpy() == name)
        rows = cat.index.iloc[at]
        index = pd.read_parquet(catalog / SHARDS / name / INDEX)
        assert index["patch_id"].tolist() == rows["patch_id"].tolist()
        out.write_shard(name, index, {"s1": cat.read("s1", rows), "s2": noisy_s2[at]})
    out.finalize()
    shutil.copyfile(catalog / "catalog.json", out.root / "catalog.json")
    return NoisyWorld(out.root, sigma)


def gaussian_blur(dn: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3σ, reflect padding) of ``(B, C, H, W)``, band by band."""
    radius = int(3 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = dn.shape[1]
    x = F.pad(dn, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def write_degraded(catalog: Path, out: Path, seed: int) -> Path:
    """An input cache for every catalogued tile: the real S2 blurred and colour-shifted (a fixed per-band gain and
    offset drawn from ``seed``), uint16 DN, in the format Stage 1 and the refiners write."""
    cat = ShardStore(catalog)
    s2 = torch.from_numpy(cat.read("s2").astype(np.float32))
    rng = np.random.default_rng(seed)
    gain = torch.from_numpy(rng.uniform(0.75, 1.25, s2.shape[1]).astype(np.float32)).view(1, -1, 1, 1)
    offset = torch.from_numpy(rng.uniform(-400.0, 400.0, s2.shape[1]).astype(np.float32)).view(1, -1, 1, 1)
    degraded = gain * gaussian_blur(s2, BLUR_SIGMA_PX) + offset
    opt = degraded.round().clamp(0, 65535).numpy().astype(np.uint16)
    store = ShardStore(out)
    store.write_shard("00000", cat.index.drop(columns=["shard", "row"]), {"opt": opt})
    store.finalize()
    return store.root


def write_params(folder: Path, catalog: Path, empty_mlflow_db: Path, source: Path, train: Train = TRAIN) -> Path:
    """A params file with every output (MLflow store, checkpoints, caches) in ``folder``; ``source`` is opt_v1."""
    shutil.copyfile(empty_mlflow_db, folder / "mlflow.db")
    params = Params(
        data=DataParams(source="synthetic"),
        mlflow=MlflowParams(tracking_uri=f"sqlite:///{folder}/mlflow.db", artifact_location=str(folder / "mlruns")),
        catalog=CatalogParams(out=str(catalog)),
        stage1=Stage1Params(out=str(source)),
        stage2=Stage2Params(img_size=128, train=train, cache=CACHE, nll_weight=NLL_WEIGHT, out=str(folder / "stage2")),
        stage3=Stage3Params(img_size=128, train=train, cache=CACHE, nll_weight=NLL_WEIGHT, out=str(folder / "stage3")),
    )
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def split_ids(catalog: Path, split: str) -> list[str]:
    """Patch ids of ``split`` that a stage trains on or is scored on (flagged tiles left out, as the stages do)."""
    index = keep_unflagged(ShardStore(catalog).index, EXCLUDE)
    return index.loc[index["split"] == split, "patch_id"].tolist()


def held_out(catalog: Path, store: Path) -> dict:
    """Mean metrics of ``store``'s ``test`` tiles against the real S2 (:func:`gac.evaluation.metrics.per_tile`), plus
    the
    per-tile PSNR under ``psnr_tiles``."""
    cat, src = ShardStore(catalog), ShardStore(store)
    ids = split_ids(catalog, "test")
    rows = cat.rows_for(ids)
    values = metrics.per_tile(
        torch.from_numpy(src.read("opt", src.rows_for(ids)).astype(np.float32)),
        torch.from_numpy(cat.read("s2", rows).astype(np.float32)),
        torch.from_numpy(cat.read("s1", rows).astype(np.float32)),
    )
    return {k: float(v.mean()) for k, v in values.items()} | {"psnr_tiles": values["psnr"].numpy()}


def train_stage(
    stage: str,
    folder: Path,
    params: Path,
    source_flag: str,
    source: Path,
    catalog: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict:
    """``gac stage2``/``gac stage3`` as the DVC stage runs it (train, export, write the next cache); its summary.

    The task's seen-tiles audit (:data:`gac.training.task.SEEN_TILES_ENV`) proves the fit trained on train tiles only.
    """
    from gac.cli import main
    from gac.training.task import SEEN_TILES_ENV

    monkeypatch.setenv("GAC_PROGRESS", "0")
    monkeypatch.setenv(SEEN_TILES_ENV, str(folder / "seen"))
    summary = folder / f"{stage}.json"
    start = time.perf_counter()
    rc = main(["--params", str(params), stage, source_flag, str(source), "--metrics", str(summary), "--no-register"])
    seconds = time.perf_counter() - start
    assert rc == 0
    seen = {line.split("\t")[-1] for line in (folder / "seen" / "rank0.txt").read_text().splitlines()}
    train = split_ids(catalog, "train")
    assert seen == set(train), "the fit trained on other tiles than the (unflagged) train split"
    result = json.loads(summary.read_text())
    assert result["global_step"] == math.ceil(len(train) / TRAIN.batch_size) * TRAIN.epochs
    return result | {"seconds": seconds}


@dataclass
class Verdict:
    """What :func:`learning_check` found: the held-out gains and every way they fall short of the stage's bar."""

    stage: str
    before: dict
    after: dict
    failures: list[str]

    @property
    def learnt(self) -> bool:
        return not self.failures

    @property
    def mean_gain(self) -> float:
        return self.after["psnr"] - self.before["psnr"]

    @property
    def tile_gains(self) -> np.ndarray:
        return self.after["psnr_tiles"] - self.before["psnr_tiles"]


def learning_check(stage: str, before: dict, after: dict) -> Verdict:
    """Whether ``after`` (a stage's output cache) improves on ``before`` (its input) by the stage's :data:`BARS`, on
    the held-out tiles: the verdict and its reasons, so a control can assert that it fails."""
    bar, verdict = BARS[stage], Verdict(stage, before, after, [])
    if verdict.mean_gain < bar.mean_db:
        verdict.failures.append(
            f"held-out PSNR {before['psnr']:.2f} → {after['psnr']:.2f} dB: {verdict.mean_gain:+.2f} dB, less than "
            f"{bar.mean_db} dB gained"
        )
    short = verdict.tile_gains < bar.tile_db
    if short.any():
        verdict.failures.append(
            f"{short.sum()} of {len(short)} held-out tiles gained less than {bar.tile_db} dB (smallest gain "
            f"{verdict.tile_gains.min():+.2f} dB)"
        )
    if after["ssim"] < before["ssim"]:
        verdict.failures.append(f"held-out SSIM fell: {before['ssim']:.4f} → {after['ssim']:.4f}")
    return verdict


@dataclass
class SigmaVerdict:
    """What :func:`sigma_check` found on the held-out tiles: σ metrics and how they fall short of :data:`SIGMA_BAR`."""

    stage: str
    numbers: dict
    failures: list[str]

    @property
    def learnt(self) -> bool:
        return not self.failures


def sigma_check(stage: str, catalog: Path, noisy: NoisyWorld, store: Path) -> SigmaVerdict:
    """The σ a stage wrote into its cache (key ``sigma``) on the ``test`` tiles, against the known σ of the noise
    (``spearman_known``) and against the noisy targets it describes (:func:`gac.evaluation.uncertainty.report`)."""
    from gac.evaluation import uncertainty

    ids, src, cat = split_ids(catalog, "test"), ShardStore(store), ShardStore(noisy.catalog)
    at = src.rows_for(ids)
    mean, sigma = (src.read(k, at) for k in ("opt", "sigma"))
    target = cat.read("s2", cat.rows_for(ids))
    positions = [ShardStore(catalog).index["patch_id"].tolist().index(pid) for pid in ids]
    known = noisy.sigma[positions]
    numbers = uncertainty.report(*uncertainty.from_dn(mean, sigma, target))  # reflectance, as gac evaluate scores
    numbers["spearman_known"] = uncertainty.band_spearman(sigma, known)
    failures = []
    if not numbers["spearman_known"] >= SIGMA_BAR.spearman:
        failures.append(f"Spearman(σ, known σ) {numbers['spearman_known']:.3f} < {SIGMA_BAR.spearman}")
    low, high = SIGMA_BAR.coverage95
    if not low <= numbers["coverage95"] <= high:
        failures.append(f"95 % interval covers {numbers['coverage95']:.4f}, outside [{low}, {high}]")
    return SigmaVerdict(stage, numbers, failures)


def report_sigma(verdict: SigmaVerdict, label: str = "") -> None:
    n, DN = verdict.numbers, metrics.DN_SCALE  # noqa: N806 - the figures are reflectance; printed in DN
    print(
        f"{verdict.stage}{label} σ on the held-out tiles (DN): Spearman with the known σ {n['spearman_known']:.3f}; "
        f"coverage 68 % {n['coverage68']:.4f}, 95 % {n['coverage95']:.4f}; UCE {n['uce'] * DN**2:.1f} DN²; "
        f"Spearman(|error|, σ) per pixel {n['spearman_pixel']:.3f}, per tile {n['spearman_tile']:.3f}; sharpness "
        f"{n['sharpness'] * DN:.1f} DN; {'learnt' if verdict.learnt else 'not learnt: ' + '; '.join(verdict.failures)}"
    )


def report(verdict: Verdict, summary: dict, label: str = "") -> None:
    before, after, gains = verdict.before, verdict.after, verdict.tile_gains
    print(
        f"\n{verdict.stage}{label}: {summary['global_step']} steps, {summary['seconds']:.0f} s (train + cache); "
        f"held-out {len(gains)} tiles: PSNR {before['psnr']:.2f} → {after['psnr']:.2f} dB ({verdict.mean_gain:+.2f}; "
        f"per tile {gains.min():+.2f} … {gains.max():+.2f}), SSIM {before['ssim']:.4f} → {after['ssim']:.4f}, "
        f"SAM {before['sam_deg']:.2f} → {after['sam_deg']:.2f}°, SAR edge {before['sar_edge']:.3f} → "
        f"{after['sar_edge']:.3f}; validation {summary.get('val/psnr', float('nan')):.2f} dB; "
        f"{'learnt' if verdict.learnt else 'not learnt: ' + '; '.join(verdict.failures)}"
    )


def stage2_verdict(
    catalog: Path,
    noisy: NoisyWorld,
    empty_mlflow_db: Path,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    train: Train,
    label: str = "",
) -> tuple[Verdict, SigmaVerdict]:
    """``gac stage2`` trained with ``train`` on opt_v1 (seed 1), checked on the held-out tiles of its opt_v2."""
    opt_v1 = write_degraded(catalog, folder / "opt_v1", seed=1)
    params = write_params(folder, noisy.catalog, empty_mlflow_db, opt_v1, train)
    summary = train_stage("stage2", folder, params, "--stage1-dir", opt_v1, catalog, monkeypatch)
    verdict = learning_check("stage2", held_out(catalog, opt_v1), held_out(catalog, folder / "stage2" / "opt_v2"))
    report(verdict, summary, label)
    sigma = sigma_check("stage2", catalog, noisy, folder / "stage2" / "opt_v2")
    report_sigma(sigma, label)
    return verdict, sigma


def test_stage2_learns_to_refine_opt_v1_on_held_out_tiles(
    catalog: Path, noisy: NoisyWorld, empty_mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    verdict, sigma = stage2_verdict(catalog, noisy, empty_mlflow_db, tmp_path, monkeypatch, TRAIN)
    assert verdict.learnt, verdict.failures
    assert sigma.learnt, sigma.failures


def test_the_learning_check_fails_stage2_trained_with_lr_1e_9(
    catalog: Path, noisy: NoisyWorld, empty_mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the Stage 2 test's run (same data, seed, steps) with lr 1e-9. Its weights cannot move, so its
    opt_v2 is its input and its σ head is still constant per band; both checks must say so — were one to pass, it
    would be measuring something other than training."""
    train = TRAIN.model_copy(update={"lr": NO_LEARNING_LR})
    label = f" with lr {NO_LEARNING_LR:g}"
    verdict, sigma = stage2_verdict(catalog, noisy, empty_mlflow_db, tmp_path, monkeypatch, train, label)
    assert not verdict.learnt, f"lr {NO_LEARNING_LR:g} passed the learning check: {verdict.mean_gain:+.2f} dB"
    assert verdict.mean_gain < BARS["stage2"].mean_db and (verdict.tile_gains < BARS["stage2"].tile_db).all()
    assert not sigma.learnt and sigma.numbers["spearman_known"] < SIGMA_BAR.spearman, sigma.numbers


def test_stage3_learns_to_ground_opt_v2_on_held_out_tiles(
    catalog: Path, noisy: NoisyWorld, empty_mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opt_v2 = write_degraded(catalog, tmp_path / "opt_v2", seed=2)
    params = write_params(tmp_path, noisy.catalog, empty_mlflow_db, opt_v2)  # opt_v1 is not read by Stage 3
    summary = train_stage("stage3", tmp_path, params, "--stage2-dir", opt_v2, catalog, monkeypatch)
    verdict = learning_check("stage3", held_out(catalog, opt_v2), held_out(catalog, tmp_path / "stage3" / "opt_v3"))
    report(verdict, summary)
    sigma = sigma_check("stage3", catalog, noisy, tmp_path / "stage3" / "opt_v3")
    report_sigma(sigma)
    assert verdict.learnt, verdict.failures
    assert sigma.learnt, sigma.failures


def fits_in(seen_file: Path) -> list[set[str]]:
    """The seen-tiles audit split into one set of patch ids per fit (each fit's steps start again at 0)."""
    fits, last = [], None
    for line in seen_file.read_text().splitlines():
        epoch, step, pid = line.split("\t")
        key = (int(epoch), int(step))
        if last is None or key < last:
            fits.append(set())
        fits[-1].add(pid)
        last = key
    return fits


def test_stage2_cross_fitting_writes_every_train_tile_with_a_model_that_never_saw_it(
    catalog: Path, empty_mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stage2.cross_fit_folds: 2``: two fold trainings, each without its fold; opt_v2 of a train tile comes from
    the fold model that did not train on it, every other tile from the main model (so Stage 3 trains on honest
    inputs). With ``cross_fit_spread`` the fold models' disagreement joins σ."""
    from gac.cli import main
    from gac.inference.engine import to_dn
    from gac.training.crossfit import fold_dir, fold_of
    from gac.training.export import apply, apply_with_sigma, load_model
    from gac.training.task import SEEN_TILES_ENV

    opt_v1 = write_degraded(catalog, tmp_path / "opt_v1", seed=1)
    params = write_params(tmp_path, catalog, empty_mlflow_db, opt_v1)
    values = yaml.safe_load(params.read_text())
    values["stage2"]["cross_fit_folds"] = 2
    values["stage2"]["train"]["epochs"] = 1
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    monkeypatch.setenv("GAC_PROGRESS", "0")
    monkeypatch.setenv(SEEN_TILES_ENV, str(tmp_path / "seen"))
    rc = main(["--params", str(params), "stage2", "--stage1-dir", str(opt_v1), "--metrics",
               str(tmp_path / "stage2.json"), "--no-register"])  # fmt: skip
    assert rc == 0

    train = split_ids(catalog, "train")
    folds = [{pid for pid in train if fold_of(pid, 2) == i} for i in range(2)]
    assert all(folds), "both folds should hold train tiles"
    main_seen, *fold_seen = fits_in(tmp_path / "seen" / "rank0.txt")
    assert main_seen == set(train)
    assert fold_seen == [set(train) - folds[0], set(train) - folds[1]]

    out = tmp_path / "stage2"
    opt_v2, cat, src = ShardStore(out / "opt_v2"), ShardStore(catalog), ShardStore(opt_v1)
    models = {"main": load_model(out / "model")[2]} | {i: load_model(fold_dir(out, i) / "model")[2] for i in (0, 1)}
    test_tile = split_ids(catalog, "test")[0]
    for pid, who in [(sorted(folds[0])[0], 0), (sorted(folds[1])[0], 1), (test_tile, "main")]:
        x = torch.from_numpy(src.read("opt", src.rows_for([pid])).astype(np.float32)) / 10000
        s1 = torch.from_numpy(cat.read("s1", cat.rows_for([pid])).astype(np.float32))
        with torch.no_grad():
            expected = {k: to_dn((apply("stage2", m, s1, x.clamp(0, 1)) * 10000)[0].numpy()) for k, m in models.items()}
        written = opt_v2.read("opt", opt_v2.rows_for([pid]))[0].astype(np.int32)
        assert np.abs(written - expected[who].astype(np.int32)).max() <= 1, (pid, who)
        others = [k for k in expected if k != who]
        assert all(np.abs(written - expected[k].astype(np.int32)).max() > 1 for k in others), (pid, who)
    provenance = json.loads((out / "opt_v2" / "provenance.json").read_text())
    assert provenance["cross_fit_folds"] == 2 and len(provenance["fold_models"]) == 2

    # stage2.cross_fit_spread: the same models write σ = √(head σ² + the folds' spread²) (no training: --cache-only)
    values["stage2"]["cross_fit_spread"] = True
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    before = opt_v2.read("sigma")
    assert main(["--params", str(params), "stage2", "--stage1-dir", str(opt_v1), "--cache-only"]) == 0
    opt_v2 = ShardStore(out / "opt_v2")
    x = torch.from_numpy(src.read("opt", src.rows_for([test_tile])).astype(np.float32)) / 10000
    s1 = torch.from_numpy(cat.read("s1", cat.rows_for([test_tile])).astype(np.float32))
    with torch.no_grad():
        head = apply_with_sigma("stage2", models["main"], s1, x.clamp(0, 1))[1]
        means = torch.stack([apply("stage2", models[i], s1, x.clamp(0, 1)) for i in (0, 1)])
    spread = means.std(0)
    expected = to_dn((torch.sqrt(head.square() + spread.square()) * 10000)[0].numpy()).astype(np.int32)
    written = opt_v2.read("sigma", opt_v2.rows_for([test_tile]))[0].astype(np.int32)
    assert np.abs(written - expected).max() <= 1
    assert (spread * 10000 > 1).float().mean() > 0.5  # the folds disagree: the spread is not a rounding error
    after = opt_v2.read("sigma")
    assert (after >= before).all() and (after > before).any()  # in quadrature: never smaller, larger where it counts
    assert json.loads((out / "opt_v2" / "provenance.json").read_text())["cross_fit_spread"] is True
