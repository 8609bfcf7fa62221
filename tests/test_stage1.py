"""Stage 1 (TerraMind S1 → S2L2A into the opt_v1 cache): alignment, reproducibility, resume, sharding, bad tiles.

One seeded random-init ``terramind_v1_tiny_generate`` (img_size 128, 1 diffusion step) is built per module, saved as
a local checkpoint (``stage1.ckpt_path``) and passed to :func:`gac.inference.generate.run` as ``model=``; the CLI in a
subprocess
loads the same checkpoint, so in-process caches are byte-comparable with the caches the CLI writes. Subprocesses are
used only where the behaviour is about processes: a SIGKILL and resume, ``torchrun`` sharding, the CLI's summary line
and its MLflow run.

Why a checkpoint and not plain random init: TerraMind's diffusion decoder (a guided-diffusion UNet) zero-initialises
its residual, attention and final output convolutions, so a random-init generator returns exactly the per-band
pretraining mean for every pixel of every tile, whatever the SAR, the seed or the number of steps. Nothing could tell a
shifted, mixed or re-seeded cache from a correct one. The checkpoint gives those layers PyTorch's default
convolution init, which makes the output depend on the SAR, the noise and the steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import killpoint
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gac.config import CatalogParams, DataParams, MlflowParams, Params, Stage1Params
from gac.errors import GacError
from gac.inference import generate as stage1
from gac.io.store import ShardStore

N_TILES = 4
#: What every test generates with: 2 shards of 2 tiles, one batch per shard, 1 diffusion step, CPU.
BASE = Stage1Params(timesteps=1, img_size=128, batch_size=2, shard_size=2, device="cpu", seed=0)
CPU = torch.device("cpu")
#: CPU kernels sum in an order that depends on the thread count, which moves ~0.05 % of the DN by ±1; every process
#: here (pytest, the CLI, each torchrun rank) runs one intra-op thread so that caches compare byte for byte.
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}


# -- fixtures ------------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs like the subprocesses (see ONE_THREAD)


@pytest.fixture(scope="module")
def catalog(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real catalog (the catalog stage over synthetic tiles) of :data:`N_TILES` tiles."""
    from gac.data.catalog import build

    out = tmp_path_factory.mktemp("stage1") / "catalog"
    build(CatalogParams(out=str(out), max_tiles=N_TILES, shard_size=N_TILES, workers=0), synthetic_root, progress=False)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A seeded random-init generator with its zero-initialised layers given a default init, and its checkpoint."""
    from gac.models.terramind import build_generator

    torch.manual_seed(BASE.seed)
    model = build_generator(BASE)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1 and not weight.any():
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # what a fresh nn.Conv2d holds
    path = tmp_path_factory.mktemp("ckpt") / "generator.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def p(weights: tuple[Path, torch.nn.Module]) -> Stage1Params:
    """:data:`BASE` with the checkpoint: what the in-process runs and the CLI runs generate with."""
    return BASE.model_copy(update={"ckpt_path": str(weights[0])})


@pytest.fixture(scope="module")
def model(weights: tuple[Path, torch.nn.Module]) -> torch.nn.Module:
    """The generator the CLI builds for :func:`p` (its checkpoint holds exactly these weights)."""
    return weights[1]


@pytest.fixture(scope="module")
def reference(catalog: Path, p: Stage1Params, model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process opt_v1 of the whole catalog: what every other way of running must equal."""
    out = tmp_path_factory.mktemp("reference") / "opt_v1"
    report = stage1.run(p.model_copy(update={"out": str(out)}), str(catalog), model=model, progress=False)
    assert (report.processed, report.generated, report.errors) == (N_TILES, N_TILES, [])
    return out


@pytest.fixture(scope="module")
def two_tiles(catalog: Path, p: Stage1Params, model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """opt_v1 of the first two tiles only (``max_tiles: 2``): the catalog's first shard, generated again."""
    out = tmp_path_factory.mktemp("two") / "opt_v1"
    stage1.run(p.model_copy(update={"out": str(out), "max_tiles": 2}), str(catalog), model=model, progress=False)
    return out


class BandTiler(torch.nn.Module):
    """TerraMind's *interface* with an identity inside: ``{"S1GRD": x}`` → ``{"S2L2A": x tiled to 12 bands}``.

    Not a stand-in for TerraMind's behaviour: it lets the alignment tests see exactly which pixel of the model's
    output lands where in opt_v1, which only an identity can show. It records the input shapes it was given.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, inputs: dict[str, torch.Tensor], timesteps: int) -> dict[str, torch.Tensor]:
        x = inputs["S1GRD"]
        self.seen.append(tuple(x.shape))
        return {"S2L2A": x.repeat(1, 6, 1, 1)}


def pattern_s1(n: int) -> torch.Tensor:
    """Positive, asymmetric S1-shaped tiles (a ramp per channel and tile, a hot pixel at (3, 7))."""
    rows = torch.arange(120.0)[:, None]
    cols = torch.arange(120.0)[None, :]
    x = torch.stack([torch.stack([10 * rows + (c + 1) * cols + 1000 * t for c in range(2)]) for t in range(n)])
    x[..., 3, 7] = 60000.0
    return x


def write_catalog(root: Path, rows: pd.DataFrame, s1: np.ndarray, s2: np.ndarray) -> Path:
    """A catalog store written by hand (one shard), for inputs the catalog stage would never let through."""
    store = ShardStore(root)
    store.write_shard("00000", rows.drop(columns=["shard", "row"]), {"s1": s1, "s2": s2})
    store.finalize()
    return root


def read_cache(root: Path) -> tuple[list[str], np.ndarray]:
    store = ShardStore(root)
    return list(store.index["patch_id"]), store.read("opt")


def assert_same_cache(root: Path, expected: Path) -> None:
    """Same tiles in the same order, none twice, identical opt arrays, no unfinished folders."""
    ids, opt = read_cache(root)
    ref_ids, ref_opt = read_cache(expected)
    assert ids == ref_ids
    assert len(set(ids)) == len(ids)
    np.testing.assert_array_equal(opt, ref_opt)
    assert not list(root.rglob(".tmp-*"))


def write_params(tmp: Path, out: Path, stage1_params: Stage1Params, empty_mlflow_db: Path) -> Path:
    """A params.yaml for the CLI whose MLflow store (a copy of the session's empty one: creating a store costs
    seconds) and artifacts live in ``tmp``."""
    shutil.copyfile(empty_mlflow_db, tmp / "mlflow.db")
    params = Params(
        data=DataParams(source="synthetic"),
        mlflow=MlflowParams(tracking_uri=f"sqlite:///{tmp}/mlflow.db", artifact_location=str(tmp / "mlartifacts")),
        stage1=stage1_params.model_copy(update={"out": str(out)}),
    )
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def cli(params: Path, catalog: Path, out: Path, metrics: Path) -> list[str]:
    """``gac stage1`` arguments; timesteps and batch size come from flags (the file has the defaults 2 and 4)."""
    return [
        "--params", str(params), "stage1", "--data-dir", str(catalog), "--output-dir", str(out),
        "--metrics", str(metrics), "--timesteps", str(BASE.timesteps), "--batch-size", str(BASE.batch_size),
        "--max-tiles", str(N_TILES), "--no-progress",
    ]  # fmt: skip


def cli_params(p: Stage1Params) -> Stage1Params:
    """What the params file says: ``p`` but with other timesteps/batch size (which the CLI flags override)."""
    return p.model_copy(update={"timesteps": Stage1Params().timesteps, "batch_size": 1})


# -- alignment -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("img_size", [128, 224])
def test_generate_returns_each_pixel_where_its_input_was(img_size: int) -> None:
    """Through the real padding/cropping of :func:`gac.inference.generate.generate`, an identity model gives back
    its input."""
    s1 = pattern_s1(3)
    tiler = BandTiler()
    out = stage1.generate(tiler, s1, BASE.model_copy(update={"img_size": img_size}), CPU)
    assert tiler.seen == [(3, 2, img_size, img_size)]
    assert out.shape == (3, 12, 120, 120)
    assert torch.equal(out, s1.repeat(1, 6, 1, 1))
    assert torch.equal(out[:, 4, 3, 7], torch.full((3,), 60000.0))


def test_run_stores_each_tile_aligned_under_its_own_patch_id(catalog: Path, tmp_path: Path) -> None:
    """The whole stage with the identity: batching, sharding and the store keep tiles and pixels in place."""
    rows = ShardStore(catalog).index.head(3)  # 3 tiles: a full shard and a short one, a short last batch
    s1 = pattern_s1(3)
    write_catalog(tmp_path / "catalog", rows, s1.numpy(), ShardStore(catalog).read("s2", rows))
    p = BASE.model_copy(update={"out": str(tmp_path / "opt_v1")})
    report = stage1.run(p, str(tmp_path / "catalog"), model=BandTiler(), progress=False)
    assert report.summary_line() == f"Processed 3/3 tiles, Errors 0, Output dir {p.out}"
    ids, opt = read_cache(tmp_path / "opt_v1")
    assert ids == list(rows["patch_id"])
    np.testing.assert_array_equal(opt, stage1.to_dn(s1.repeat(1, 6, 1, 1).numpy()))
    cache = ShardStore(tmp_path / "opt_v1").index
    assert list(cache["crs"]) == list(rows["crs"]) and list(cache["split"]) == list(rows["split"])


# -- the real generator, in process ---------------------------------------------------------------------------------
def test_reference_is_a_plausible_l2a_cache(reference: Path, catalog: Path) -> None:
    ids, opt = read_cache(reference)
    assert ids == list(ShardStore(catalog).index["patch_id"])
    assert opt.dtype == np.uint16 and opt.shape == (N_TILES, 12, 120, 120)
    assert len(np.unique(opt)) > 100 and not np.array_equal(opt[0], opt[1])  # generated per tile, not a fill
    assert json.loads((reference / stage1.CONFIG_FILE).read_text())["timesteps"] == BASE.timesteps


def test_same_seed_gives_identical_bytes_and_a_rerun_generates_nothing(
    two_tiles: Path, reference: Path, catalog: Path, p: Stage1Params, model: torch.nn.Module
) -> None:
    """Shard 00000 of two separate runs (different max_tiles, same seed) is the same file, byte for byte."""
    first = (two_tiles / "shards" / "00000" / "opt.npy").read_bytes()
    assert first == (reference / "shards" / "00000" / "opt.npy").read_bytes()
    again = stage1.run(p.model_copy(update={"out": str(two_tiles), "max_tiles": 2}), str(catalog), model=model)
    assert (again.generated, again.skipped, again.processed) == (0, 2, 2)
    assert (two_tiles / "shards" / "00000" / "opt.npy").read_bytes() == first


def test_dataloader_workers_prefetching_shards_give_the_same_cache(
    catalog: Path, p: Stage1Params, model, tmp_path: Path
) -> None:
    """With ``num_workers: 2`` the batches of two shards (two batches each) arrive interleaved from two reader
    processes; each shard must still be assembled from its own batches, in order: the in-process cache, byte for byte.
    """
    single = p.model_copy(update={"batch_size": 1})
    caches = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        q = single.model_copy(update={"out": str(out), "num_workers": workers})
        report = stage1.run(q, str(catalog), model=model, progress=False)
        assert (report.processed, report.generated, report.errors) == (N_TILES, N_TILES, [])
        caches[workers] = out
    assert_same_cache(caches[2], caches[0])


def test_changing_timesteps_rebuilds_the_cache(two_tiles: Path, catalog: Path, p, model, tmp_path: Path) -> None:
    """A cache made with other settings is not resumed (that would mix two generations): it is rebuilt."""
    out = tmp_path / "opt_v1"
    shutil.copytree(two_tiles, out)
    _, before = read_cache(out)
    changed = p.model_copy(update={"out": str(out), "max_tiles": 2, "timesteps": 2})
    report = stage1.run(changed, str(catalog), model=model, progress=False)
    assert (report.generated, report.skipped) == (2, 0)
    assert json.loads((out / stage1.CONFIG_FILE).read_text())["timesteps"] == 2
    ids, after = read_cache(out)
    assert ids == read_cache(two_tiles)[0]
    assert not np.array_equal(after, before)


def test_k_draws_store_their_mean_and_their_spread(two_tiles: Path, catalog: Path, p, model, tmp_path: Path) -> None:
    """``samples: 2``: opt_v1 is the mean of two draws and ``sigma`` their spread, each draw continuing the batch's
    seeded stream (recomputed here draw by draw); the draws differ, so the spread is real; one draw stores no σ, and
    its fingerprint is the one it always had (a one-draw cache stays valid)."""
    from gac.inference import engine

    out = tmp_path / "opt_v1"
    report = stage1.run(p.model_copy(update={"out": str(out), "max_tiles": 2, "samples": 2}), str(catalog),
                        model=model, progress=False)  # fmt: skip
    assert (report.generated, report.errors) == (2, [])
    cat = ShardStore(catalog)
    s1 = torch.from_numpy(cat.read("s1", cat.rows_for(ShardStore(out).index["patch_id"])))
    engine.seed_batch(p.seed, "00000", 0)  # 2 tiles = shard 00000, batch 0, as the engine seeds it
    draws = torch.stack([stage1.generate(model, s1, p, CPU) for _ in range(2)])
    store = ShardStore(out)
    assert np.array_equal(store.read("opt"), engine.to_dn(draws.mean(0).numpy()))
    assert np.array_equal(store.read("sigma"), engine.to_dn(draws.std(0).numpy()))
    assert (store.read("sigma") > 0).mean() > 0.5
    assert not ShardStore(two_tiles).has("sigma") and ShardStore(out).has("sigma")
    assert "samples" not in json.loads((two_tiles / stage1.CONFIG_FILE).read_text())
    assert json.loads((out / stage1.CONFIG_FILE).read_text())["samples"] == 2


def test_a_tile_with_nan_sar_is_recorded_and_the_others_are_generated(
    catalog: Path, p: Stage1Params, model: torch.nn.Module, tmp_path: Path
) -> None:
    store = ShardStore(catalog)
    rows = store.index.head(2)
    s1 = store.read("s1", rows)
    s1[0, 0, :20] = np.nan  # what the catalog stage rejects; written by hand to reach Stage 1 anyway
    write_catalog(tmp_path / "catalog", rows, s1, store.read("s2", rows))
    out = tmp_path / "opt_v1"
    report = stage1.run(p.model_copy(update={"out": str(out)}), str(tmp_path / "catalog"), model=model, progress=False)
    bad, good = rows["patch_id"]
    assert [e["patch_id"] for e in report.errors] == [bad]
    assert "non-finite SAR" in report.errors[0]["reason"]
    assert report.summary_line() == f"Processed 2/2 tiles, Errors 1, Output dir {out}"
    ids, opt = read_cache(out)
    assert ids == [good] and np.isfinite(opt).all()
    assert list(ShardStore(out).rejected()["patch_id"]) == [bad]


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_a_precision_without_native_support_is_refused_before_any_tile(
    precision: str, catalog: Path, p: Stage1Params, tmp_path: Path
) -> None:
    """CPU bf16 without AVX512-BF16/AMX is emulated (~150x slower than fp32) and fp16 autocast is for CUDA: one line.

    Where this CPU does have native bf16 the run must go through in bf16 instead (both branches assert behaviour).
    """
    cpu = torch.device("cpu")
    q = p.model_copy(update={"out": str(tmp_path / "opt_v1"), "max_tiles": 1, "precision": precision, "device": "cpu"})
    if precision == "bf16" and stage1.native_bf16(cpu):
        assert stage1.run(q, str(catalog), progress=False).generated == 1
        return
    with pytest.raises(GacError, match=rf"^stage1\.precision: '{precision}' on cpu has no native support") as err:
        stage1.run(q, str(catalog), progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "opt_v1").exists()  # refused before the cache (or a model) was touched


@pytest.mark.skipif(not stage1.native_bf16(CPU), reason="no AVX512-BF16/AMX: bf16 is refused here")
def test_the_generator_the_stage_builds_runs_on_the_fast_path(
    catalog: Path, p: Stage1Params, model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gac stage1`` in bf16 builds its generator (from ``ckpt_path``) with the weights cast once and the decoder's
    layout for this CPU: the same cache as plain autocast over the same weights where the layout is NCHW (bit for
    bit: the same casts, done once), within the stated bf16 difference where it is channels-last (AMX)."""
    from gac.evaluation import metrics
    from gac.inference import fastpath

    prepared: list[torch.nn.Module] = []
    prepare = fastpath.prepare
    monkeypatch.setattr(fastpath, "prepare", lambda m, *a: prepared.append(m) or prepare(m, *a))  # a spy: it runs
    bf16 = p.model_copy(update={"max_tiles": 2, "precision": "bf16"})
    built = stage1.run(bf16.model_copy(update={"out": str(tmp_path / "built")}), str(catalog), progress=False)
    [generator] = prepared
    cast = [m for m in generator.modules() if isinstance(m, fastpath.CAST_ON_CALL)]
    assert cast and {w.dtype for m in cast for w in m.parameters()} == {torch.bfloat16}
    given = bf16.model_copy(update={"out": str(tmp_path / "given")})  # a model given is run as it is: autocast
    stage1.run(given, str(catalog), model=model, progress=False)
    assert built.generated == 2 and {w.dtype for w in model.parameters()} == {torch.float32}
    if fastpath.layout(CPU, "bf16") == "contiguous":
        assert_same_cache(tmp_path / "built", tmp_path / "given")
    else:
        ours, plain = (torch.from_numpy(read_cache(tmp_path / d)[1].astype(np.float32)) for d in ("built", "given"))
        assert metrics.psnr(metrics.to_reflectance(ours), metrics.to_reflectance(plain)).mean().item() > 45.0


def test_precision_auto_picks_the_native_one_says_why_and_keeps_it_in_the_provenance(
    catalog: Path,
    p: Stage1Params,
    model: torch.nn.Module,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``auto`` is bf16 on a CPU with AVX512-BF16/AMX and 32 elsewhere: the cache equals the one the chosen precision
    writes when it is set by hand (same identity, same bytes), and the choice is printed and kept in provenance."""
    from gac.config import Params
    from gac.inference import engine, fastpath
    from gac.io.provenance import read_provenance
    from gac.stages import stage1 as stage

    native = stage1.native_bf16(CPU)
    auto = p.model_copy(update={"out": str(tmp_path / "auto"), "max_tiles": 2, "precision": "auto"})
    section, why = stage.choose_precision(auto)
    assert section.precision == ("bf16" if native else "32")
    assert why.startswith("auto: ") and ("AMX" in why or "AVX512-BF16" in why) == native
    assert capsys.readouterr().out == f"stage1.precision: {section.precision} ({why})\n"
    report = stage1.run(auto, str(catalog), model=model, progress=False)
    by_hand = p.model_copy(update={"out": str(tmp_path / "set"), "max_tiles": 2, "precision": section.precision})
    stage1.run(by_hand, str(catalog), model=model, progress=False)
    assert_same_cache(tmp_path / "auto", tmp_path / "set")
    assert json.loads((tmp_path / "auto" / "stage1.json").read_text()) == json.loads(
        (tmp_path / "set" / "stage1.json").read_text()
    )
    stage.record(Params(), section, report, why)
    provenance = read_provenance(tmp_path / "auto", "stage1")
    assert (provenance["precision"], provenance["precision_choice"]) == (section.precision, why)
    assert (provenance["decoder_layout"], provenance["compile"]) == (fastpath.layout(CPU, section.precision), False)
    # and where the hardware has no bf16 (this CPU's probe answering no), auto falls back to float32 and says so
    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    assert engine.resolve_precision(CPU, "auto") == (
        "32", "auto: cpu without native bf16 (needs AMX or AVX512-BF16 on a CPU, or a bf16 GPU)")  # fmt: skip


# -- weights from a local checkpoint --------------------------------------------------------------------------------
def test_ckpt_path_loads_exactly_those_weights(weights: tuple[Path, torch.nn.Module], p: Stage1Params) -> None:
    """The saved weights come back exactly (the woken layers are zero in any fresh init: only loading sets them)."""
    from gac.models.terramind import build_generator

    checkpoint, model = weights
    torch.manual_seed(BASE.seed + 1)
    loaded = build_generator(p).state_dict()
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert loaded["tokenizer.tok_sen2l2a@224.decoder.out.2.weight"].any()
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert stage1.fingerprint(p, ["x"])["weights"] == sha  # other weights → another cache


@pytest.mark.parametrize("damage", ["truncated", "mismatching"])
def test_a_bad_checkpoint_is_one_clear_error(damage: str, weights: tuple[Path, torch.nn.Module], tmp_path) -> None:
    from gac.models.terramind import build_generator

    checkpoint = weights[0]
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        with checkpoint.open("rb") as f:
            bad.write_bytes(f.read(checkpoint.stat().st_size // 2))
    else:
        torch.save({"encoder.weight": torch.zeros(3)}, bad)
    with pytest.raises(GacError, match=r"^stage1\.ckpt_path: ") as err:
        build_generator(BASE.model_copy(update={"ckpt_path": str(bad)}))
    assert "\n" not in str(err.value)
    assert ("not a loadable state dict" if damage == "truncated" else "does not match the model") in str(err.value)


# -- processes: kill and resume, the CLI, torchrun -------------------------------------------------------------------
def first_shard_then_kill(args: list[str], shards: Path, log: Path, timeout: float = 600) -> None:
    """Start ``gac`` and SIGKILL it as soon as its first shard is complete."""
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "gac", *args], stdout=f, stderr=f, env=ONE_THREAD)
    deadline = time.monotonic() + timeout
    try:
        while not (shards / "00000").is_dir():
            if proc.poll() is not None:
                pytest.fail(f"gac stage1 ended (rc {proc.returncode}) before it was killed:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no shard appeared in time")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def resumed(catalog: Path, p: Stage1Params, empty_mlflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SIGKILL ``gac stage1`` inside the write of its second shard (at a seeded point, :mod:`killpoint`), then rerun it
    to completion."""
    tmp = tmp_path_factory.mktemp("resume")
    out, metrics = tmp / "opt_v1", tmp / "stage1.json"
    args = cli(write_params(tmp, out, cli_params(p), empty_mlflow_db), catalog, out, metrics)
    killed = killpoint.kill_inside_a_shard_write(args, out, N_TILES // BASE.shard_size, tmp / "killed.log", ONE_THREAD)
    print(f"resuming after kill seed {killed['seed']}")
    return killed | {"out": out, "metrics": metrics, "tmp": tmp, "stdout": killpoint.rerun(args)}


@pytest.mark.slow
def test_a_run_killed_inside_a_shard_write_resumes_to_the_uninterrupted_cache(resumed: dict, reference: Path) -> None:
    """The kill left shard 00000 complete and shard 00001 half-written under ``.tmp-``; the resumed cache is the
    uninterrupted one file for file, byte for byte (a resume that kept the half-written shard could not be)."""
    out, seed = resumed["out"], resumed["seed"]
    assert resumed["done"] == ["00000"] and resumed["shard"] == "00001", f"seed {seed}: {resumed}"
    assert resumed["partial"] is not None and "digest.sha256" not in resumed["partial"], (
        f"seed {seed}: the kill must land inside shard 00001's write, which leaves it half-written: {resumed}"
    )
    assert killpoint.store_bytes(out) == killpoint.store_bytes(reference), f"seed {seed}"
    assert_same_cache(out, reference)
    for name, mtime in resumed["survived"].items():  # shards from before the kill were kept, not redone
        assert (out / "shards" / name / "opt.npy").stat().st_mtime_ns == mtime, f"seed {seed}"
    metrics = json.loads(resumed["metrics"].read_text())
    assert metrics["generated_this_run"] == N_TILES - BASE.shard_size * len(resumed["survived"])
    assert (metrics["processed"], metrics["total"], metrics["errors"]) == (N_TILES, N_TILES, 0)


@pytest.mark.slow
def test_a_rerun_that_generates_nothing_reports_the_speed_of_the_run_that_did(
    resumed: dict, p: Stage1Params, catalog: Path, empty_mlflow_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``dvc metrics show`` must not read 0 tiles/s after a repro that found the cache complete."""
    from gac.cli import main

    rerun_metrics = tmp_path / "rerun.json"  # and an MLflow store of its own (the run test counts the first one's)
    params = write_params(tmp_path, resumed["out"], cli_params(p), empty_mlflow_db)
    args = cli(params, catalog, resumed["out"], rerun_metrics)
    code = main(args)  # in this process: the rerun's metrics are the subject, not a fresh interpreter
    assert code == 0, capsys.readouterr().err[-3000:]
    before, after = (json.loads(f.read_text()) for f in (resumed["metrics"], rerun_metrics))
    assert after["generated_this_run"] == 0 and before["generated_this_run"] > 0
    assert after["tiles_per_s"] == before["tiles_per_s"] > 0


@pytest.mark.slow
def test_cli_prints_the_summary_line(resumed: dict) -> None:
    lines = resumed["stdout"].splitlines()
    assert f"Processed {N_TILES}/{N_TILES} tiles, Errors 0, Output dir {resumed['out']}" in lines


@pytest.mark.slow
def test_the_run_is_in_mlflow_with_its_params_and_metrics(resumed: dict, p: Stage1Params) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{resumed['tmp']}/mlflow.db")
    experiment = client.get_experiment_by_name("gac")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the killed process never got as far as logging
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["gac.stage"] == "stage1"
    params = run.data.params
    assert (params["timesteps"], params["batch_size"], params["shard_size"]) == ("1", "2", "2")  # flags won
    assert (params["weights_origin"], params["data_source"]) == (f"local checkpoint: {p.ckpt_path}", "synthetic")
    metrics = run.data.metrics
    assert (metrics["processed"], metrics["errors"]) == (N_TILES, 0)
    assert metrics["generated_this_run"] == N_TILES - BASE.shard_size * len(resumed["survived"])


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_cache(
    catalog, p: Stage1Params, reference: Path, empty_mlflow_db: Path, tmp_path
) -> None:
    """Two ranks share the shards (i mod 2); per-batch seeding makes the union equal a single process's cache."""
    torchrun = Path(sys.executable).with_name("torchrun")
    out, metrics = tmp_path / "opt_v1", tmp_path / "stage1.json"
    args = cli(write_params(tmp_path, out, cli_params(p), empty_mlflow_db), catalog, out, metrics)
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "gac", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_cache(out, reference)
    assert sum(line.startswith("Processed ") for line in done.stdout.splitlines()) == 1  # rank 0 reports
    assert json.loads(metrics.read_text())["processed"] == N_TILES
