"""Stage 2/3 training: Lightning fit, checkpoints, MLflow run + registry round trip, kill-and-resume, DDP, the CLI.

Everything runs for real on CPU: tiny random-init models (Prithvi-EO-2.0 tiny, TerraMind v1 tiny, img_size 128), two
to four tiles per split, at most six optimizer steps, MLflow on a SQLite file in a temporary folder. The network-level
behaviour (LoRA sites, identity at init, gradients) is tested in ``test_prithvi.py`` and ``test_grounding.py``; here
it is what training does with them. Subprocesses are used only where the behaviour is about processes: a SIGKILL and
resume, Lightning's DDP launcher, and the CLI's metrics file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import killpoint
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gac.config import CatalogParams, DataParams, MlflowParams, Params, Stage1Params, Stage2Params, Stage3Params
from gac.config import TrainParams as Train
from gac.io.store import ShardStore
from gac.mlops.registry import log_and_register
from gac.training.export import apply
from gac.training.stages import TRAINED_STAGES

STAGE_NAMES = ("stage2", "stage3")
#: In-process fits: 2 train + 2 validation tiles, one batch per epoch, a validation and a last.ckpt every step.
TRAIN = Train(
    batch_size=2, epochs=100, max_steps=3, val_every_n_steps=1, save_every_n_steps=1, max_tiles=2, accelerator="cpu"
)
#: Stage 3 also trains a σ head (``nll_weight``), so the fit's calibration, its logging and the registered model's
#: ``{opt, sigma}`` run here; Stage 2 is a model without one, as the code's default builds it.
SECTIONS = {
    "stage2": Stage2Params(img_size=128, train=TRAIN),
    "stage3": Stage3Params(img_size=128, train=TRAIN, nll_weight=0.05),
}
#: What a LoRA run may train: adapters on attention (Stage 2) or decoder cross-attention (Stage 3), and the heads.
LORA = r"\.lora_[AB]\.default\.weight"
TRAINABLE = {
    "stage2": re.compile(
        rf"backbone\.blocks\.\d+\.attn\.(qkv|proj){LORA}|backbone\.patch_embed\.proj\.new_band_weight|head\..+"
    ),
    "stage3": re.compile(rf"encdec\.decoder\.\d+\.cross_attn\.(q|kv|proj){LORA}|(pixel|sar|sigma)_head\..+"),
}
ENV = os.environ | {"GAC_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


# -- data ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def catalog(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The catalog of the session's synthetic tiles, train and validation splits (8 each; runs use 2–4 of them).

    DDP needs an even number of train tiles: DistributedSampler pads an odd count by repeating a tile on one rank.
    """
    from gac.data.catalog import build

    out = tmp_path_factory.mktemp("training") / "catalog"
    build(CatalogParams(out=str(out), splits=["train", "validation"], workers=0), synthetic_root, progress=False)
    splits = ShardStore(out).index["split"].value_counts()
    assert splits["train"] >= 4 and splits["validation"] >= 4, splits
    return out


@pytest.fixture(scope="module")
def opt_v1(catalog: Path) -> Path:
    """An opt_v1-shaped cache without running TerraMind: the real S2 blurred, darkened and noised.

    Stage 1's own tests cover how opt_v1 is generated; training only needs a cache of the same format (key ``opt``,
    uint16 DN, the catalog's index rows) that is a plausible, imperfect guess of the truth.
    """
    cat = ShardStore(catalog)
    s2 = cat.read("s2").astype(np.float32)
    kernel = np.ones(5, np.float32) / 5  # separable 5×5 box blur along both image axes
    blurred = np.apply_along_axis(np.convolve, -1, s2, kernel, mode="same")
    blurred = np.apply_along_axis(np.convolve, -2, blurred, kernel, mode="same")
    noise = np.random.default_rng(0).normal(0.0, 150.0, s2.shape)
    opt = np.clip(0.9 * blurred + noise, 0, 65535).astype(np.uint16)
    store = ShardStore(catalog.parent / "opt_v1")
    store.write_shard("00000", cat.index.drop(columns=["shard", "row"]), {"opt": opt})
    store.finalize()
    return store.root


def tiles(catalog: Path, opt_v1: Path, split: str, n: int = 2) -> dict[str, np.ndarray]:
    """Model input of the first ``n`` tiles of ``split``: S1 dB and opt_v1 reflectance (float32)."""
    cat, src = ShardStore(catalog), ShardStore(opt_v1)
    ids = cat.index.loc[cat.index["split"] == split, "patch_id"].head(n)
    opt = src.read("opt", src.rows_for(ids)).astype(np.float32) / 10000.0
    return {"s1": cat.read("s1", cat.rows_for(ids)).astype(np.float32), "opt": np.clip(opt, 0, 1)}


# -- in-process fits -------------------------------------------------------------------------------------------------
def mlflow_store(folder: Path, empty_mlflow_db: Path) -> MlflowParams:
    """MLflow on a copy of the session's empty SQLite store in ``folder`` (migrating a new one costs seconds)."""
    shutil.copyfile(empty_mlflow_db, folder / "mlflow.db")
    return MlflowParams(tracking_uri=f"sqlite:///{folder}/mlflow.db", artifact_location=str(folder / "mlartifacts"))


@pytest.fixture(scope="module")
def mlflow_params(catalog: Path, empty_mlflow_db: Path) -> MlflowParams:
    return mlflow_store(catalog.parent, empty_mlflow_db)


@pytest.fixture(scope="module", params=STAGE_NAMES)
def fitted(request, catalog: Path, opt_v1: Path, mlflow_params: MlflowParams) -> dict:
    """One in-process fit per stage, registered ``@challenger``; Stage 3 trains on the opt_v1 store as its source."""
    from gac.training.fit import fit

    stage = request.param
    section = SECTIONS[stage].model_copy(update={"out": str(catalog.parent / stage)})
    result = fit(
        stage,
        section,
        mlflow_params,
        str(catalog),
        str(opt_v1),
        tags={"gac.data": "synthetic"},
        log_model=log_and_register,
    )
    assert result is not None
    return {"stage": stage, "section": section, "result": result}


@pytest.fixture(scope="module")
def rebuilt(fitted: dict):
    """The task rebuilt from the best checkpoint alone (its hyper-parameters name the section), in eval mode."""
    ckpt = torch.load(fitted["result"].best_checkpoint, map_location="cpu", weights_only=True)
    task = TRAINED_STAGES[fitted["stage"]].task(ckpt["hyper_parameters"]["section"]).build()
    task.load_state_dict(ckpt["state_dict"])
    return task.eval(), ckpt


def client(mlflow_params: MlflowParams):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_params.tracking_uri)


def history(mlflow_client, run_id: str, key: str) -> list[int]:
    """Steps at which ``key`` was logged, sorted (a step logged twice appears twice)."""
    return sorted(m.step for m in mlflow_client.get_metric_history(run_id, key))


def test_fit_keeps_best_and_last_checkpoints(fitted: dict, rebuilt) -> None:
    result, steps = fitted["result"], TRAIN.max_steps
    assert Path(result.best_checkpoint).name == "best.ckpt" and Path(result.last_checkpoint).name == "last.ckpt"
    last = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    _, best = rebuilt
    assert result.global_step == last["global_step"] == steps
    assert 1 <= best["global_step"] <= steps
    assert sorted(p.name for p in Path(result.best_checkpoint).parent.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    model_dir = Path(result.model_dir)
    assert (model_dir / "weights.safetensors").is_file() and (model_dir / "params.json").is_file()
    assert (model_dir.parent / "logs" / "metrics.csv").is_file()


def test_only_lora_adapters_and_heads_train(fitted: dict, rebuilt) -> None:
    stage, result = fitted["stage"], fitted["result"]
    task, ckpt = rebuilt
    report = TRAINED_STAGES[stage].report(task.model)
    assert report["share"] < 0.2 and report["share"] == pytest.approx(result.trainable["share"])
    assert report["names"] and all(TRAINABLE[stage].fullmatch(n) for n in report["names"]), report["names"]
    assert any("lora_" in n for n in report["names"])
    # Only those reached the optimizer: its state holds one entry per trainable tensor, of that tensor's shape.
    trainable = [p for p in task.parameters() if p.requires_grad]
    state = ckpt["optimizer_states"][0]["state"]
    assert len(ckpt["optimizer_states"][0]["param_groups"][0]["params"]) == len(trainable) == len(state)
    assert [state[i]["exp_avg"].shape for i in sorted(state)] == [p.shape for p in trainable]


def test_the_mlflow_run_has_params_step_metrics_and_the_best_checkpoint(
    fitted: dict, rebuilt, mlflow_params: MlflowParams
) -> None:
    stage, result = fitted["stage"], fitted["result"]
    c = client(mlflow_params)
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["gac.stage"] == stage
    params = run.data.params
    assert (params["train.max_steps"], params["train.batch_size"], params["img_size"]) == ("3", "2", "128")
    assert params["lora.rank"] == str(fitted["section"].lora.rank)
    assert history(c, result.run_id, "train/loss") == list(range(TRAIN.max_steps))  # every step, once
    for key in ("val/psnr", "val/ssim", "val/sam_deg", "val/sar_edge", "val/loss"):
        assert history(c, result.run_id, key) == list(range(TRAIN.max_steps)), key  # val_every_n_steps = 1
    # best.ckpt is the validation that scored best on the task's monitor, and its score is the run's best_score
    task_cls = TRAINED_STAGES[stage].task
    scores = {m.step: m.value for m in c.get_metric_history(result.run_id, task_cls.monitor)}
    pick = max if task_cls.mode == "max" else min
    best_step = pick(scores, key=scores.get)
    assert rebuilt[1]["global_step"] == best_step + 1
    assert result.best_score == pytest.approx(scores[best_step], rel=1e-6)
    assert run.data.metrics["best_score"] == pytest.approx(result.best_score)
    assert run.data.metrics["trainable_share"] == pytest.approx(result.trainable["share"])
    assert [a.path for a in c.list_artifacts(result.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]


def test_the_mlflow_run_is_named_shows_its_datasets_curves_and_validation_tiles_and_logs_params_once(
    fitted: dict, catalog: Path, opt_v1: Path, mlflow_params: MlflowParams
) -> None:
    """What the MLflow UI shows of a training run besides numbers (see gac.training.run_media)."""
    from gac.io import tracking
    from gac.training.run_media import N_TILES

    stage, result = fitted["stage"], fitted["result"]
    c = client(mlflow_params)
    run = c.get_run(result.run_id)
    assert run.info.run_name == tracking.run_name(stage)
    assert not [k for k in run.data.params if "/" in k]  # once, flat: no Lightning `section/train/lr` copies
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"catalog", "opt_v1"}
    for name, root in (("catalog", catalog), ("opt_v1", opt_v1)):
        digest = ShardStore(root).content_digest()
        tags = {t.key: t.value for t in inputs[name].tags}
        assert inputs[name].dataset.digest == digest[: tracking.DATASET_DIGEST_CHARS]
        assert tags["gac.content_sha256"] == digest and tags["mlflow.data.context"] == "training"
        assert int(tags["tiles.train"]) >= 4 and int(tags["tiles.validation"]) >= 4
    curves = {a.path for a in c.list_artifacts(result.run_id, "curves")}
    assert {"curves/train_loss.png", "curves/val_psnr.png", "curves/val_selection.png"} <= curves
    tiles = list(c.list_artifacts(result.run_id, "validation"))
    assert len(tiles) == N_TILES and all(a.path.endswith(".png") and a.file_size > 0 for a in tiles)


def test_the_model_is_registered_as_challenger_with_a_model_card(fitted: dict, mlflow_params: MlflowParams) -> None:
    from gac.mlops.registry import CHALLENGER, MODEL_NAMES

    stage, result = fitted["stage"], fitted["result"]
    version = client(mlflow_params).get_model_version_by_alias(MODEL_NAMES[stage], CHALLENGER)
    assert version.run_id == result.run_id and int(version.version) == result.metrics["registered_version"]
    assert MODEL_NAMES[stage] in version.description and "random init" in version.description
    assert version.tags["stage"] == stage and version.tags["gac.data"] == "synthetic"


def test_the_registry_model_predicts_what_the_best_checkpoint_does(
    fitted: dict, rebuilt, catalog: Path, opt_v1: Path, mlflow_params: MlflowParams
) -> None:
    import mlflow

    from gac.mlops.registry import CHALLENGER, MODEL_NAMES

    stage = fitted["stage"]
    task, _ = rebuilt
    x = tiles(catalog, opt_v1, "validation")
    mlflow.set_tracking_uri(mlflow_params.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAMES[stage]}@{CHALLENGER}").predict(x)
    with torch.inference_mode():
        expected = apply(stage, task.model, torch.from_numpy(x["s1"]), torch.from_numpy(x["opt"])).numpy()
    if fitted["section"].nll_weight > 0:  # mean and σ; σ itself is compared in test_the_sigma_head_is_calibrated…
        assert set(served) == {"opt", "sigma"} and served["sigma"].shape == expected.shape
        served = served["opt"]
    assert served.shape == expected.shape == (2, 12, 120, 120)
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    assert np.abs(expected - x["opt"]).max() > 1e-4  # training moved the model away from the identity it starts as


def test_the_sigma_head_is_calibrated_on_validation_and_the_run_logs_it(
    fitted: dict, rebuilt, catalog: Path, opt_v1: Path, mlflow_params: MlflowParams
) -> None:
    """The exported model holds the per-band temperature the fit found on the validation split (the closed-form NLL
    minimiser, recomputed here from the checkpoint's σ), and the run logs it with the calibrated report."""
    from gac.evaluation.uncertainty import fit_temperature
    from gac.sensors import S2_BANDS
    from gac.training.datamodule import PairDataModule
    from gac.training.export import apply_with_sigma, load_model

    stage, result = fitted["stage"], fitted["result"]
    _, _, model = load_model(result.model_dir)
    if fitted["section"].nll_weight == 0:
        assert not hasattr(model, "sigma_head") or model.sigma_head is None
        assert not result.calibration
        return
    task, _ = rebuilt  # the best checkpoint: σ as trained, temperature 1
    assert torch.equal(task.model.sigma_head.temperature, torch.ones(12))
    data = PairDataModule(str(catalog), str(opt_v1), TRAIN.batch_size, 0, TRAIN.max_tiles)
    data.setup("fit")
    cat, src = ShardStore(catalog), ShardStore(opt_v1)
    x = {"s1": cat.read("s1", cat.rows_for(data.val_ids)).astype(np.float32)}
    x["opt"] = np.clip(src.read("opt", src.rows_for(data.val_ids)).astype(np.float32) / 10000.0, 0, 1)
    target = torch.from_numpy(cat.read("s2", cat.rows_for(data.val_ids)).astype(np.float32) / 10000.0).clamp(0, 1)
    with torch.inference_mode():
        mean, sigma = apply_with_sigma(stage, task.model, torch.from_numpy(x["s1"]), torch.from_numpy(x["opt"]))
    expected = fit_temperature(mean, sigma, target)
    stored = model.sigma_head.temperature
    assert not torch.allclose(stored, torch.ones(12))
    torch.testing.assert_close(stored, expected, rtol=1e-3, atol=0)
    metrics = client(mlflow_params).get_run(result.run_id).data.metrics
    logged = torch.tensor([metrics[f"calibration/T_{band}"] for band in S2_BANDS])
    torch.testing.assert_close(logged, stored, rtol=1e-6, atol=0)
    for key in ("uce", "coverage68", "coverage95", "spearman_pixel", "spearman_tile", "sharpness"):
        assert f"calibration/val_{key}" in metrics, key
    assert "val/loss_nll" in metrics


def test_rewriting_a_cache_with_the_same_model_gives_the_same_bytes(
    fitted: dict, catalog: Path, opt_v1: Path, tmp_path: Path
) -> None:
    """A cache is a DVC output: the same tiles must hash the same, or every stage downstream reruns for nothing."""
    from gac.inference.refine import write_cache
    from gac.io.provenance import read_provenance, timing_path
    from gac.training.export import load_model

    stage, _, model = load_model(fitted["result"].model_dir)
    out = tmp_path / "cache"
    snapshots, timings = [], []
    for _ in range(2):
        info = write_cache(stage, model, str(catalog), str(opt_v1), out, provenance={"model_dir": "m"})
        snapshots.append({f.relative_to(out).as_posix(): f.read_bytes() for f in out.rglob("*") if f.is_file()})
        timings.append(info["seconds_per_tile"])
    assert snapshots[0] == snapshots[1] and "provenance.json" in snapshots[0]
    assert timing_path(out).is_file() and not timing_path(out).is_relative_to(out)
    assert read_provenance(out, stage)["seconds_per_tile"] == timings[-1] > 0  # evaluation still sees the timing


def test_registering_the_same_model_again_reuses_its_version(
    fitted: dict, empty_mlflow_db: Path, tmp_path: Path
) -> None:
    """A stage rerun that leaves the model as it was moves ``@challenger`` back to it instead of adding a copy."""
    import mlflow
    from safetensors.torch import load_file, save_file

    from gac.io import tracking
    from gac.mlops.registry import CHALLENGER, MODEL_NAMES, log_and_register

    result, section = fitted["result"], fitted["section"]
    changed = tmp_path / "changed"  # the same model with one weight nudged
    shutil.copytree(result.model_dir, changed)
    weights = load_file(changed / "weights.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key] + 1e-3
    save_file(weights, changed / "weights.safetensors")
    store = mlflow_store(tmp_path, empty_mlflow_db)
    tracking.setup(store)  # the experiment's artifacts in tmp_path too, not in the working directory
    versions = []
    for model_dir in (result.model_dir, result.model_dir, changed, result.model_dir):
        with mlflow.start_run():
            versions.append(log_and_register(str(model_dir), section, result.metrics))
    assert versions == ["1", "1", "2", "1"]
    c = client(store)
    name = MODEL_NAMES[fitted["stage"]]
    assert len(c.search_model_versions(f"name = '{name}'")) == 2
    assert str(c.get_model_version_by_alias(name, CHALLENGER).version) == "1"


def test_a_fit_with_nothing_left_to_train_scores_the_best_weights_again(
    catalog: Path, opt_v1: Path, empty_mlflow_db: Path, tmp_path: Path
) -> None:
    """``dvc repro`` reruns a stage when its code changed; finding training complete, it must still report val/*."""
    from gac.training.fit import fit

    store = mlflow_store(tmp_path, empty_mlflow_db)
    section = SECTIONS["stage2"].model_copy(update={"out": str(tmp_path / "stage2")})
    first = fit("stage2", section, store, str(catalog), str(opt_v1), register=False, log_model=log_and_register)
    again = fit("stage2", section, store, str(catalog), str(opt_v1), register=False, log_model=log_and_register)
    assert first is not None and again is not None
    assert (again.global_step, again.run_id) == (first.global_step, first.run_id)  # resumed, in the same run
    assert history(client(store), first.run_id, "train/loss") == list(range(TRAIN.max_steps))  # nothing retrained
    monitor = TRAINED_STAGES["stage2"].task.monitor
    assert again.metrics.keys() >= {"val/psnr", "val/ssim", "val/sam_deg", "val/sar_edge", monitor}
    # the best checkpoint's score, recomputed: what the first fit's tracker recorded for it
    assert again.best_score == again.metrics[monitor] == pytest.approx(first.best_score, rel=1e-5, abs=1e-6)


def test_stage3_lora_cross_attention_flag(tmp_path: Path) -> None:
    """The committed params put Stage 3's LoRA on cross-attention; the flag forces that, and only when passed."""
    from gac.cli import build_parser
    from gac.cli.flags import apply, passed

    self_attention = r".*decoder\.\d+\.attn\.(qkv|proj)"
    cfg = Params(stage3=Stage3Params(lora=Stage3Params().lora.model_copy(update={"target_modules": self_attention})))
    parser = build_parser()
    assert "cross_attn" in Stage3Params().lora.target_modules
    # not passed: the params file decides (no flag changes a setting the user did not pass)
    assert apply(cfg, passed(parser.parse_args(["stage3"]), "stage3")).stage3.lora.target_modules == self_attention
    on = parser.parse_args(["stage3", "--lora-cross-attention-only"])
    assert apply(cfg, passed(on, "stage3")).stage3.lora.target_modules == Stage3Params().lora.target_modules
    opted_out = parser.parse_args(["stage3", "--no-lora-cross-attention-only", "--lora-rank", "4"])
    section = apply(cfg, passed(opted_out, "stage3")).stage3
    assert (section.lora.target_modules, section.lora.rank) == (self_attention, 4)


# -- processes: the CLI, kill and resume, DDP -----------------------------------------------------------------------
def write_params(tmp: Path, catalog: Path, opt_v1: Path, empty_mlflow_db: Path) -> Path:
    """A params file whose MLflow store, artifacts and stage outputs all live in ``tmp`` (small training settings)."""
    train = TRAIN.model_copy(update={"max_steps": 4})
    params = Params(
        data=DataParams(source="synthetic"),
        mlflow=mlflow_store(tmp, empty_mlflow_db),
        catalog=CatalogParams(out=str(catalog)),
        stage1=Stage1Params(out=str(opt_v1)),
        stage2=Stage2Params(img_size=128, train=train, out=str(tmp / "stage2")),
        stage3=Stage3Params(img_size=128, train=train, out=str(tmp / "stage3")),
    )
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def stage2_cli(tmp: Path, catalog: Path, opt_v1: Path, empty_mlflow_db: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "gac", "--params", str(write_params(tmp, catalog, opt_v1, empty_mlflow_db)), "stage2",
        "--data-dir", str(catalog), "--stage1-dir", str(opt_v1), "--output-dir", str(tmp / "stage2"),
        "--metrics", str(tmp / "stage2.json"), "--no-cache", "--no-register", *flags,
    ]  # fmt: skip


def global_step(ckpt: Path) -> int | None:
    """``global_step`` of a checkpoint, or ``None`` while it is not there (Lightning replaces it atomically)."""
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def kill_after_step(cmd: list[str], ckpt: Path, step: int, log: Path, timeout: float = 600) -> None:
    """Start ``cmd`` and SIGKILL it once ``ckpt`` holds at least ``step`` optimizer steps."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=log.parent)
    deadline = time.monotonic() + timeout
    try:
        while (global_step(ckpt) or 0) < step:
            if proc.poll() is not None:
                pytest.fail(f"gac stage2 ended (rc {proc.returncode}) before it was killed:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint of step {step} in time:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def resumed(catalog: Path, opt_v1: Path, empty_mlflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``gac stage2 --max-steps 6`` SIGKILLed after its second step, then the same command again to completion."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("resume")
    cmd = stage2_cli(tmp, catalog, opt_v1, empty_mlflow_db, "--max-steps", "6", "--save-every", "1", "--val-every", "1")
    ckpt, run_file = tmp / "stage2" / "checkpoints" / "last.ckpt", tmp / "stage2" / "checkpoints" / "mlflow_run.json"
    kill_after_step(cmd, ckpt, 2, tmp / "killed.log")
    killed_at, run_id = global_step(ckpt), json.loads(run_file.read_text())["run_id"]
    mlflow_client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    logged_before = history(mlflow_client, run_id, "train/loss")
    killpoint.rerun(cmd[3:], cwd=tmp)  # `python -m gac …` again, in this process
    return {
        "tmp": tmp,
        "killed_at": killed_at,
        "run_id": run_id,
        "logged_before": logged_before,
        "client": mlflow_client,
    }


@pytest.mark.slow
def test_a_killed_fit_resumes_in_the_same_run_without_repeating_steps(resumed: dict) -> None:
    tmp, run_id, c = resumed["tmp"], resumed["run_id"], resumed["client"]
    assert 2 <= resumed["killed_at"] < 6, "the kill must land mid-training"
    # before the kill: the steps up to the checkpoint (the last one may be lost if the kill fell between the two)
    assert resumed["logged_before"] in (list(range(resumed["killed_at"])), list(range(resumed["killed_at"] - 1)))
    assert global_step(tmp / "stage2" / "checkpoints" / "last.ckpt") == 6
    run_file = tmp / "stage2" / "checkpoints" / "mlflow_run.json"
    assert json.loads(run_file.read_text())["run_id"] == run_id  # the resumed fit logged into the same run
    runs = c.search_runs([c.get_experiment_by_name("gac").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    for key in ("train/loss", "train/loss_l1"):  # each step once: the kill step is followed by the next, not redone
        steps = history(c, run_id, key)
        assert steps == sorted(set(steps)), key  # nothing logged twice
        assert set(range(resumed["killed_at"], 6)) <= set(steps) <= set(range(6)), key  # resumed from the checkpoint
        # Lightning writes last.ckpt of step k before it logs step k-1: a kill between the two loses that one value
        assert len(set(range(6)) - set(steps)) <= 1, key
    assert c.get_run(run_id).data.params["train.max_steps"] == "6"
    # metrics.csv (DVC's plots) keeps the killed fit's rows too, each step once
    rows = pd.read_csv(tmp / "stage2" / "logs" / "metrics.csv")
    assert sorted(rows.loc[rows["train/loss"].notna(), "step"]) == history(c, run_id, "train/loss")
    # A validation the kill interrupted is not redone (last.ckpt is written before it): at most one step is missing.
    val_steps = sorted(rows.loc[rows["val/psnr"].notna(), "step"])
    assert val_steps == history(c, run_id, "val/psnr") and len(set(val_steps)) == len(val_steps) >= 5


@pytest.mark.slow
def test_the_cli_writes_the_metrics_summary(resumed: dict) -> None:
    summary = json.loads((resumed["tmp"] / "stage2.json").read_text())
    assert summary["global_step"] == 6
    # the best checkpoint has the lowest validation selection score
    assert np.isfinite(summary["best_score"]) and summary["best_score"] <= summary["val/selection"] + 1e-6
    assert 0 < summary["trainable_share"] < 0.2 and summary["trainable_params"] > 0
    assert "seconds_per_tile" not in summary  # --no-cache: no opt_v2 was written
    assert not (resumed["tmp"] / "stage2" / "opt_v2").exists()
    assert not [k for k in summary if "loss_" in k]  # loss terms: in the curves' log and MLflow, not dvc metrics show


@pytest.mark.slow
def test_the_cli_writes_one_training_curve_per_metric(resumed: dict) -> None:
    """The files ``dvc plots`` draws (``plots/<stage>/*.csv`` in ``dvc.yaml``): one metric each, from the log of a
    killed and resumed fit, with every step it logged that metric at, once, and no blank cell."""
    from gac.training.curves import CURVES

    log = pd.read_csv(resumed["tmp"] / "stage2" / "logs" / "metrics.csv")
    for stem, (column, name) in CURVES.items():
        curve = pd.read_csv(resumed["tmp"] / "stage2" / "plots" / f"{stem}.csv")
        assert list(curve.columns) == ["step", name], stem
        assert curve.notna().all().all() and curve["step"].is_monotonic_increasing, stem
        assert list(curve["step"]) == sorted(set(log.loc[log[column].notna(), "step"])), stem
        assert len(curve) >= (5 if stem == "train_loss" else 1), stem  # 6 steps, one may be lost to the kill


@pytest.mark.slow
def test_ddp_ranks_train_on_disjoint_tiles_and_rank_zero_checkpoints_once(
    catalog: Path, opt_v1: Path, empty_mlflow_db: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from gac.training.task import SEEN_TILES_ENV

    cmd = stage2_cli(
        tmp_path, catalog, opt_v1, empty_mlflow_db, "--max-steps", "2", "--max-tiles", "4",
        "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
    )  # fmt: skip
    env = ENV | {SEEN_TILES_ENV: str(tmp_path / "seen")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen: dict[int, dict[int, set[str]]] = {}  # rank → epoch → tiles
    for rank in (0, 1):
        seen[rank] = defaultdict(set)
        for line in (tmp_path / "seen" / f"rank{rank}.txt").read_text().splitlines():
            epoch, _, patch_id = line.split("\t")
            seen[rank][int(epoch)].add(patch_id)
    cat = ShardStore(catalog).index
    train_ids = set(cat.loc[cat["split"] == "train", "patch_id"].head(4))
    assert sorted(seen[0]) == sorted(seen[1]) == [0, 1]  # 4 tiles, 2 ranks, batch 2: one step per epoch
    for epoch in (0, 1):
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == 2
        assert not seen[0][epoch] & seen[1][epoch], f"epoch {epoch}: both ranks trained on the same tile"
        assert seen[0][epoch] | seen[1][epoch] == train_ids
    checkpoints = tmp_path / "stage2" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert global_step(checkpoints / "last.ckpt") == 2
    assert json.loads((tmp_path / "stage2.json").read_text())["global_step"] == 2
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("gac").experiment_id])
    assert len(runs) == 1 and history(c, runs[0].info.run_id, "train/loss") == [0, 1]  # rank 0 alone logs


# -- what continues, what starts again (gac.training.fit's rule) ----------------------------------------------------
def test_a_training_continues_only_with_the_same_inputs_and_model_settings(
    catalog: Path, opt_v1: Path, empty_mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More steps (and settings that cannot change the model) continue; new input *content* at the same path,
    another lr or a smaller budget start again; another DVC experiment continues in a run of its own."""
    from gac.training.fit import fit

    store = mlflow_store(tmp_path, empty_mlflow_db)
    c = client(store)
    source = tmp_path / "opt_v1"  # a copy the test may change in place: the path stays, the content changes
    shutil.copytree(opt_v1, source)
    base = SECTIONS["stage2"].model_copy(update={"out": str(tmp_path / "stage2")})

    def run(max_steps: int, **train):
        section = base.model_copy(update={"train": base.train.model_copy(update={"max_steps": max_steps, **train})})
        result = fit("stage2", section, store, str(catalog), str(source), register=False, log_model=log_and_register)
        assert result is not None
        return result

    first = run(2)
    more = run(4, num_workers=1, save_every_n_steps=2)  # continues: same run, steps 2-3 added, nothing repeated
    assert (more.run_id, more.global_step) == (first.run_id, 4)
    assert history(c, first.run_id, "train/loss") == [0, 1, 2, 3]
    ckpts = sorted(p.name for p in (tmp_path / "stage2" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt beside the resumed one

    other_lr = run(4, lr=2e-3)  # another model setting: a new training in a new run
    assert other_lr.run_id != first.run_id and history(c, other_lr.run_id, "train/loss") == [0, 1, 2, 3]

    shard = ShardStore(source)
    rows = shard.index.drop(columns=["shard", "row"])
    shard.write_shard("00000", rows, {"opt": shard.read("opt") // 2})  # same path, new content
    new_input = run(4, lr=2e-3)
    assert new_input.run_id != other_lr.run_id and history(c, new_input.run_id, "train/loss") == [0, 1, 2, 3]

    fewer = run(2, lr=2e-3)  # trained for 4 steps cannot be reported as a 2-step training: it starts again
    assert fewer.run_id != new_input.run_id and fewer.global_step == 2

    monkeypatch.setenv("DVC_EXP_NAME", "exp-longer")  # `dvc exp run -S stage2.train.max_steps=4` continues...
    longer = run(4, lr=2e-3)
    assert longer.global_step == 4 and longer.run_id != fewer.run_id  # ...in a run of this experiment
    tags = c.get_run(longer.run_id).data.tags
    assert tags["gac.dvc_experiment"] == "exp-longer" and tags["gac.resumed_from_run"] == fewer.run_id
    assert "exp exp-longer" in c.get_run(longer.run_id).info.run_name
    assert history(c, longer.run_id, "train/loss") == [2, 3]  # the continued steps only, none repeated


@pytest.mark.slow
def test_stage2_load_in_8bit_trains_registers_writes_opt_v2_and_its_registered_model_computes_its_float_twin(
    catalog: Path, opt_v1: Path, empty_mlflow_db: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """``gac stage2 --load-in-8bit`` end to end: the best checkpoint goes into a fresh int8 model (bitsandbytes
    refuses it in the trained one), the model is registered, opt_v2 is written, and the registry model's prediction
    on a tile is its *float twin*'s: the same registered weights with every int8 matrix dequantised (int8 × SCB / 127)
    in a float32 refiner, which runs no bitsandbytes code. What may differ is the int8 rounding of the activations
    (row-wise absmax: at most half a step, 1/254 of a row's largest value): the residuals the two add to their input
    agree to one int8 step, 1/127 of the residual's norm; no residual at all (an output that ignored the weights)
    misses it by 127 steps."""
    import mlflow
    from safetensors.torch import load_file

    from gac.cli import main
    from gac.models.prithvi import build_refiner
    from gac.sensors import DN_SCALE
    from gac.training.export import WEIGHTS

    params = write_params(tmp_path, catalog, opt_v1, empty_mlflow_db)
    monkeypatch.chdir(tmp_path)  # the command in this process: the flag's path is the subject, not a fresh interpreter
    monkeypatch.setenv("GAC_PROGRESS", "0")
    code = main(["--params", str(params), "stage2", "--load-in-8bit", "--max-steps", "2",
                 "--metrics", str(tmp_path / "stage2.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((tmp_path / "stage2.json").read_text())
    assert summary["global_step"] == 2 and summary["registered_version"] == 1
    assert len(ShardStore(tmp_path / "stage2" / "opt_v2").index) == len(ShardStore(opt_v1).index)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    model = mlflow.pyfunc.load_model("models:/gac-stage2@challenger")
    wrapped = model.unwrap_python_model()
    assert any(type(m).__name__ == "Linear8bitLt" and m.weight.dtype == torch.int8 for m in wrapped.model.modules())
    x = tiles(catalog, opt_v1, "validation", n=1)
    y = model.predict(x)
    assert y.shape == (1, 12, 120, 120) and np.isfinite(y).all()

    folder = Path(mlflow.artifacts.download_artifacts("models:/gac-stage2@challenger", dst_path=str(tmp_path / "dl")))
    state = load_file(folder / "artifacts" / "model" / WEIGHTS)
    floats = {k: v for k, v in state.items() if not k.endswith((".SCB", ".weight_format"))}
    int8 = [k for k, v in state.items() if v.dtype == torch.int8]
    assert len(int8) == 48  # qkv, proj, fc1, fc2 of 12 blocks
    for key in int8:
        floats[key] = state[key].float() * state[key.removesuffix("weight") + "SCB"][:, None] / 127
    float32 = {"load_in_8bit": False, "pretrained": False, "ckpt_path": None}  # the weights come from the state
    twin = build_refiner(wrapped.section.model_copy(update=float32))
    twin.load_state_dict(floats, strict=True)
    assert not any(type(m).__name__ == "Linear8bitLt" for m in twin.modules())
    with torch.inference_mode():
        expected = apply("stage2", twin.eval(), torch.from_numpy(x["s1"]), torch.from_numpy(x["opt"])).numpy()
    residual = expected - x["opt"]
    assert np.abs(residual).mean() > 1 / DN_SCALE, np.abs(residual).mean()  # the trained head moves a pixel > 1 DN
    error = float(np.linalg.norm(y - expected) / np.linalg.norm(residual))
    assert error <= 1 / 127, error
