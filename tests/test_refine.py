"""Stage 2/3 cache writing (:mod:`gac.inference.refine` through :mod:`gac.inference.engine`): resumable, split across
``torchrun`` ranks,
and bounded in open files however many shards the stores have.

The model is a real Stage 3 grounder (TerraMind tiny, random init, with a σ head) whose zero-initialised pixel and σ
heads are given small random weights, so opt_v3 and its σ depend on every input pixel (an untrained grounder would copy
opt_v2, and a shifted or mixed cache could not be told from a correct one). Everything runs with one intra-op thread, in
process and in the subprocesses, so caches compare byte for byte.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import killpoint
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gac.config import CacheParams, CatalogParams, DataParams, MlflowParams, Params, Stage2Params, Stage3Params
from gac.config import TrainParams as Train
from gac.io.store import ShardStore

ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1", "GAC_PROGRESS": "0"}
CACHE = CacheParams(device="cpu", batch_size=2, shard_size=2)
#: With a σ head (moved like the pixel head), so every cache here also carries ``sigma`` through resume and ranks.
S3 = Stage3Params(img_size=128, cache=CACHE, nll_weight=0.05)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory, non_identity) -> dict[str, Path]:
    """A catalog of 8 tiles, an opt_v1-like source (the S2 darkened), and a Stage 3 model folder whose output moves."""
    from gac.data.catalog import build
    from gac.models.grounding import build_grounder
    from gac.training.export import save_model

    tmp = tmp_path_factory.mktemp("refine")
    catalog = tmp / "catalog"
    build(CatalogParams(out=str(catalog), max_tiles=8, workers=0), synthetic_root, progress=False)
    cat = ShardStore(catalog)
    source = ShardStore(tmp / "opt_v1")
    source.write_shard("00000", cat.index.drop(columns=["shard", "row"]), {"opt": cat.read("s2") // 2 + 100})
    source.finalize()
    torch.manual_seed(5)
    save_model("stage3", S3, non_identity(build_grounder(S3)), tmp / "stage3" / "model")
    return {"tmp": tmp, "catalog": catalog, "source": source.root, "model": tmp / "stage3" / "model"}


@pytest.fixture(scope="module")
def reference(inputs: dict[str, Path]) -> Path:
    """opt_v3 written in process, uninterrupted: what every other way of writing it must equal."""
    from gac.inference.refine import write_cache
    from gac.training.export import load_model

    stage, _, model = load_model(inputs["model"])
    out = inputs["tmp"] / "reference"
    info = write_cache(stage, model, str(inputs["catalog"]), str(inputs["source"]), out, CACHE, progress=False)
    assert (info["tiles"], info["errors"]) == (8, 0)
    assert len(ShardStore(out).shard_names()) == 4
    return out


def assert_same_cache(root: Path, expected: Path) -> None:
    a, b = ShardStore(root), ShardStore(expected)
    assert list(a.index["patch_id"]) == list(b.index["patch_id"])
    assert a.index["patch_id"].is_unique
    np.testing.assert_array_equal(a.read("opt"), b.read("opt"))
    np.testing.assert_array_equal(a.read("sigma"), b.read("sigma"))
    assert not list(root.rglob(".tmp-*"))


def test_the_cache_holds_the_calibrated_sigma_in_dn_beside_the_mean(inputs: dict[str, Path], reference: Path):
    """Key ``sigma``: the model's calibrated σ (temperature included) in the DN encoding of ``opt``, tile by tile."""
    from gac.inference.engine import to_dn
    from gac.sensors import DN_SCALE
    from gac.training.export import apply_with_sigma, load_model

    stage, _, model = load_model(inputs["model"])
    model.sigma_head.temperature.fill_(1.0)  # what the saved model holds (no calibration ran)
    cache, cat, src = ShardStore(reference), ShardStore(inputs["catalog"]), ShardStore(inputs["source"])
    pid = cache.index["patch_id"].iloc[3]
    s1 = torch.from_numpy(cat.read("s1", cat.rows_for([pid])).astype(np.float32))
    opt = torch.from_numpy(src.read("opt", src.rows_for([pid])).astype(np.float32)) / DN_SCALE
    with torch.inference_mode():
        mean, sigma = apply_with_sigma(stage, model, s1, opt.clamp(0, 1))
    written = {k: cache.read(k, cache.rows_for([pid]))[0].astype(np.int32) for k in ("opt", "sigma")}
    assert cache.read("sigma").dtype == np.uint16 and cache.read("sigma").shape == cache.read("opt").shape
    assert np.abs(written["opt"] - to_dn((mean * DN_SCALE)[0].numpy())).max() <= 1
    assert np.abs(written["sigma"] - to_dn((sigma * DN_SCALE)[0].numpy())).max() <= 1
    assert written["sigma"].std() > 0  # σ varies over the tile


def test_the_cache_moves_with_its_input_and_a_rerun_computes_nothing(inputs: dict[str, Path], reference: Path):
    from gac.inference.refine import write_cache
    from gac.training.export import load_model

    opt_v3, opt_v2 = ShardStore(reference).read("opt"), ShardStore(inputs["source"]).read("opt")
    assert not np.array_equal(opt_v3, opt_v2)  # the perturbed head changes every tile...
    assert np.abs(opt_v3.astype(int) - opt_v2).mean() < 2000  # ...as a residual on its input
    mtimes = {p: p.stat().st_mtime_ns for p in reference.rglob("opt.npy")}
    stage, _, model = load_model(inputs["model"])
    again = write_cache(stage, model, str(inputs["catalog"]), str(inputs["source"]), reference, CACHE)
    assert again["generated_this_run"] == 0 and again["seconds_per_tile"] > 0  # the first run's timing
    assert mtimes == {p: p.stat().st_mtime_ns for p in reference.rglob("opt.npy")}


def test_other_weights_or_other_input_content_rebuild_the_cache(inputs: dict[str, Path], reference: Path, tmp_path):
    """The fingerprint holds the weights' and the inputs' content: neither a changed model nor a changed opt_v2 at
    the same path can leave stale shards behind."""
    from gac.inference.refine import write_cache
    from gac.training.export import load_model

    out = tmp_path / "opt_v3"
    shutil.copytree(reference, out)
    stage, _, model = load_model(inputs["model"])
    with torch.no_grad():
        model.pixel_head.out.bias.add_(0.01)  # other weights
    other = write_cache(stage, model, str(inputs["catalog"]), str(inputs["source"]), out, CACHE, progress=False)
    assert other["generated_this_run"] == 8
    assert not np.array_equal(ShardStore(out).read("opt"), ShardStore(reference).read("opt"))
    source = tmp_path / "opt_v2"
    shutil.copytree(inputs["source"], source)
    store = ShardStore(source)
    store.write_shard("00000", store.index.drop(columns=["shard", "row"]), {"opt": store.read("opt") + 1})
    again = write_cache(stage, model, str(inputs["catalog"]), str(source), out, CACHE, progress=False)
    assert again["generated_this_run"] == 8  # same model, same path, new content: rebuilt


def cache_cli(tmp: Path, inputs: dict[str, Path], out: Path) -> list[str]:
    """``gac stage3 --cache-only``: opt_v3 from the model folder, no training."""
    params = Params(
        data=DataParams(source="synthetic"),
        mlflow=MlflowParams(tracking_uri=f"sqlite:///{tmp}/mlflow.db", artifact_location=str(tmp / "art")),
        stage3=S3.model_copy(update={"out": str(inputs["model"].parent)}),
    )
    (tmp / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return [
        "-m", "gac", "--params", str(tmp / "params.yaml"), "stage3", "--cache-only", "--data-dir",
        str(inputs["catalog"]), "--stage2-dir", str(inputs["source"]), "--opt-v3-dir", str(out),
    ]  # fmt: skip


@pytest.mark.slow
def test_a_cache_writer_killed_inside_a_shard_write_resumes_to_the_uninterrupted_cache(inputs, reference, tmp_path):
    """SIGKILL ``gac stage3 --cache-only`` inside the write of a seeded shard after the first (:mod:`killpoint`), then
    rerun it: the shards finished before the kill are kept, the half-written one is redone, and the cache is the
    uninterrupted one file for file, byte for byte (a resume that kept the half-written shard could not be)."""
    out = tmp_path / "opt_v3"
    args = cache_cli(tmp_path, inputs, out)
    killed = killpoint.kill_inside_a_shard_write(args[2:], out, 4, tmp_path / "killed.log", ONE_THREAD)
    seed, shard = killed["seed"], killed["shard"]
    assert killed["done"] == [f"{i:05d}" for i in range(int(shard))], f"seed {seed}: {killed}"
    assert killed["partial"] is not None and "digest.sha256" not in killed["partial"], (
        f"seed {seed}: the kill must land inside shard {shard}'s write, which leaves it half-written: {killed}"
    )
    print(f"resuming after kill seed {seed}")
    killpoint.rerun(args[2:])
    assert killpoint.store_bytes(out) == killpoint.store_bytes(reference), f"seed {seed}"
    assert_same_cache(out, reference)
    for name, mtime in killed["survived"].items():  # finished shards were kept, not redone
        assert (out / "shards" / name / "opt.npy").stat().st_mtime_ns == mtime, f"seed {seed}"


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_cache(inputs, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "opt_v3"
    torchrun = Path(sys.executable).with_name("torchrun")
    args = cache_cli(tmp_path, inputs, out)[1:]  # torchrun -m gac …
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert_same_cache(out, reference)
    assert sum("stage3: wrote" in line for line in done.stdout.splitlines()) == 1  # rank 0 reports


# -- bounded open files ----------------------------------------------------------------------------------------------
N_WIDE = 320  # tiles, one per shard, in every store: more shards than the 256 files a process may open


@pytest.fixture(scope="module")
def wide(inputs: dict[str, Path]) -> dict[str, Path]:
    """A catalog and an opt_v1 of :data:`N_WIDE` one-tile shards (the catalog's tiles repeated under new ids)."""
    cat = ShardStore(inputs["catalog"])
    rows = cat.index.drop(columns=["shard", "row"])
    s1, s2 = cat.read("s1"), cat.read("s2")
    catalog, source = ShardStore(inputs["tmp"] / "wide_catalog"), ShardStore(inputs["tmp"] / "wide_opt_v1")
    splits = ["train"] * 160 + ["validation"] * 150 + ["test"] * (N_WIDE - 310)
    for i in range(N_WIDE):
        row = rows.iloc[[i % len(rows)]].assign(patch_id=f"wide_{i:04d}", split=splits[i])
        catalog.write_shard(f"{i:05d}", row, {"s1": s1[[i % len(rows)]], "s2": s2[[i % len(rows)]]})
        source.write_shard(f"{i:05d}", row, {"opt": s2[[i % len(rows)]] // 2 + 100})
    catalog.finalize()
    source.finalize()
    return {"catalog": catalog.root, "source": source.root}


def limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


@pytest.mark.slow
def test_training_and_cache_writing_stay_under_256_open_files(inputs, wide, tmp_path: Path, empty_mlflow_db) -> None:
    """Stage 2 trains (a validation over 150 one-tile shards) and Stage 3 writes opt_v3 over 320 shards in processes
    that may open at most 256 files (``RLIMIT_NOFILE``): every memory map held open would need ~800."""
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    train = Train(batch_size=2, max_steps=2, val_every_n_steps=2, save_every_n_steps=2, accelerator="cpu")
    params = Params(
        mlflow=MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art")),
        stage2=Stage2Params(img_size=128, train=train, out=str(tmp_path / "stage2"), cache=CACHE),
        stage3=S3.model_copy(update={"out": str(inputs["model"].parent)}),
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    common = [sys.executable, "-m", "gac", "--params", str(tmp_path / "params.yaml")]
    stage2 = [*common, "stage2", "--data-dir", str(wide["catalog"]), "--stage1-dir", str(wide["source"]),
              "--no-register", "--no-cache", "--metrics", str(tmp_path / "stage2.json")]  # fmt: skip
    stage3 = [*common, "stage3", "--cache-only", "--data-dir", str(wide["catalog"]), "--stage2-dir",
              str(wide["source"]), "--opt-v3-dir", str(tmp_path / "opt_v3")]  # fmt: skip
    for cmd in (stage2, stage3):
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=ONE_THREAD, timeout=900, preexec_fn=limit_open_files
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(ShardStore(tmp_path / "opt_v3").shard_names()) == N_WIDE // CACHE.shard_size
    assert len(ShardStore(tmp_path / "opt_v3").index) == N_WIDE
    assert pd.read_json(tmp_path / "stage2.json", typ="series")["global_step"] == 2


# -- the docs' disk table ---------------------------------------------------------------------------------------------
def test_the_docs_disk_table_is_what_the_stores_take(inputs: dict[str, Path], tmp_path: Path) -> None:
    """KiB per tile in the docs' disk table (docs/results.md) = the bytes of a 512-tile catalog and opt cache in
    256-tile shards (as measured by
    benchmarks/scale.py), within 1 %; its 549,488-tile column follows from them."""
    import re

    cat = ShardStore(inputs["catalog"])
    rows, s1, s2 = cat.index.drop(columns=["shard", "row"]), cat.read("s1"), cat.read("s2")
    catalog, opt = ShardStore(tmp_path / "catalog"), ShardStore(tmp_path / "opt")
    for start in (0, 256):
        take = np.arange(start, start + 256) % len(rows)
        meta = rows.iloc[take].reset_index(drop=True).assign(patch_id=[f"t{i:07d}" for i in range(start, start + 256)])
        catalog.write_shard(f"{start // 256:05d}", meta, {"s1": s1[take], "s2": s2[take]})
        opt.write_shard(f"{start // 256:05d}", meta, {"opt": s2[take]})
    catalog.finalize()
    opt.finalize()
    readme = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    for name, store in (("catalog", catalog), ("opt cache", opt)):
        measured = sum(f.stat().st_size for f in store.root.rglob("*") if f.is_file()) / 512 / 1024
        match = re.search(rf"^\| {name}[^|]*\| ([\d.]+) \| ([\d.]+) GB \|", readme, re.MULTILINE)
        assert match, f"no '{name}' row in the disk table of docs/results.md"
        kib, gb = float(match[1]), float(match[2])
        assert kib == pytest.approx(measured, rel=0.01)
        assert gb == pytest.approx(kib * 1024 * 549_488 / 1e9, rel=0.005)


def test_stage2_cache_only_writes_opt_v2_with_the_saved_model(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``gac stage2 --cache-only``: no training, opt_v2 from ``<stage2.out>/model`` (identity at init: a copy)."""
    from gac.cli import main
    from gac.models.prithvi import build_refiner
    from gac.training.export import save_model

    s2 = Stage2Params(img_size=128, cache=CACHE, out=str(tmp_path / "stage2"))
    save_model("stage2", s2, build_refiner(s2), tmp_path / "stage2" / "model")
    params = Params(
        mlflow=MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art")),
        stage2=s2,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    args = ["--params", str(tmp_path / "params.yaml"), "stage2", "--cache-only", "--data-dir", str(inputs["catalog"]),
            "--stage1-dir", str(inputs["source"])]  # fmt: skip
    code = main(args)  # in this process: the flag's path is what is tested, not a fresh interpreter
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert f"stage2: wrote {tmp_path / 'stage2' / 'opt_v2'} (8 tiles, 0 errors)" in printed.out
    assert not (tmp_path / "stage2" / "checkpoints").exists() and not (tmp_path / "mlflow.db").exists()  # no training
    written = ShardStore(tmp_path / "stage2" / "opt_v2").read("opt")
    np.testing.assert_array_equal(written, ShardStore(inputs["source"]).read("opt"))  # untrained refiner = identity
    from gac.io.provenance import read_provenance

    # the figures' titles name it: the saved model's base weights, as a training run records them
    assert read_provenance(tmp_path / "stage2" / "opt_v2", "stage2")["weights_origin"] == "random init"
