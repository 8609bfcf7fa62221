"""Gated promotion against a real MLflow registry (SQLite in tmp_path): targets, champion comparison, the Stage 2 +
Stage 3 pair, model cards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gac.config import TargetParams
from gac.mlops.model_card import EVAL_SECTION, describe_version, eval_metrics, model_card, tag_evaluation
from gac.mlops.promote import promote

NAME = "gac-stage2"
LOW = TargetParams(psnr=10.0, ssim=0.1, sam_deg=60.0, sar_edge=0.9)
GOOD = {"psnr": 20.0, "ssim": 0.5, "ms_ssim": 0.6, "sam_deg": 20.0, "mae": 0.05, "sar_edge": 0.4, "tiles": 7}


@pytest.fixture
def client(tmp_path, empty_mlflow_db):
    from mlflow import MlflowClient

    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registry_uri=f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture
def register(client, tmp_path):
    """Create a version (a dummy artifact folder), evaluated with ``metrics`` and optionally aliased challenger."""
    source = tmp_path / "model"
    source.mkdir()
    (source / "weights.txt").write_text("dummy")

    def make(metrics: dict | None, challenger: bool = True, name: str = NAME, tags: dict | None = None) -> str:
        try:
            client.get_registered_model(name)
        except Exception:
            client.create_registered_model(name)
        version = str(client.create_model_version(name, source=str(source), tags=tags).version)
        describe_version(client, name, version, {"name": name, "version": version, "stage": "stage2",
                                                 "data": "synthetic", "weights_origin": "random init",
                                                 "git_commit": "abc123"})  # fmt: skip
        if metrics is not None:
            tag_evaluation(client, name, version, metrics, {"split": "test", "data_source": "synthetic"})
        if challenger:
            client.set_registered_model_alias(name, "challenger", version)
        return version

    return make


def write_params(folder) -> None:
    """A params file with the ``client`` fixture's store and the LOW targets, for the ``gac promote`` CLI."""
    (folder / "params.yaml").write_text(
        f"mlflow: {{tracking_uri: 'sqlite:///{folder / 'mlflow.db'}', artifact_location: '{folder / 'artifacts'}'}}\n"
        "promote:\n  objective: psnr\n  targets: {psnr: 10.0, ssim: 0.1, sam_deg: 60.0, sar_edge: 0.9}\n"
    )


def champion(client, name: str = NAME) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except Exception:
        return None


def test_first_champion_when_targets_met(client, register):
    v = register(GOOD)
    decision = promote(client, NAME, "psnr", LOW)
    assert decision.promoted and decision.candidate == v and decision.champion_before is None
    assert champion(client) == v
    assert any("no champion yet" in r for r in decision.reasons)
    assert "psnr 20.00 > target 10.00: met" in decision.reasons


def test_promotes_better_challenger(client, register):
    first = register(GOOD)
    assert promote(client, NAME, "psnr", LOW).promoted
    second = register({**GOOD, "psnr": 22.5})
    decision = promote(client, NAME, "psnr", LOW)
    assert decision.promoted and decision.champion_before == first and decision.champion_after == second
    assert champion(client) == second
    assert any("22.50 > champion version 1 20.00: beats" in r for r in decision.reasons)


def test_refuses_failed_target_with_numbers(client, register):
    v = register({**GOOD, "psnr": 14.21, "sar_edge": 0.2})
    decision = promote(client, NAME, "psnr", TargetParams())  # the seed's targets: psnr >= 30, ssim >= 0.85, ...
    assert not decision.promoted and champion(client) is None
    assert "psnr 14.21 < target 30.00: NOT met" in decision.reasons
    assert "sam_deg 20.00 > target 5.00: NOT met" in decision.reasons
    assert "sar_edge 0.20 > target 0.15: NOT met" in decision.reasons  # lower is better: above target fails
    assert decision.summary() == f"{NAME}: version {v} not promoted (no champion)"


def test_refuses_worse_than_champion(client, register):
    first = register(GOOD)
    promote(client, NAME, "psnr", LOW)
    register({**GOOD, "psnr": 19.5})  # meets every (lowered) target, but is worse than the champion
    decision = promote(client, NAME, "psnr", LOW)
    assert not decision.promoted and champion(client) == first
    assert any("19.50 < champion version 1 20.00: does NOT beat" in r for r in decision.reasons)
    assert all("NOT met" not in r for r in decision.reasons)


def test_objective_direction_lower_is_better(client, register):
    register(GOOD)
    promote(client, NAME, "sam_deg", LOW)
    better = register({**GOOD, "psnr": 15.0, "sam_deg": 12.0})  # lower PSNR, but lower (better) SAM
    assert promote(client, NAME, "sam_deg", LOW).promoted and champion(client) == better
    register({**GOOD, "sam_deg": 13.0})
    assert not promote(client, NAME, "sam_deg", LOW).promoted and champion(client) == better


def test_missing_eval_and_missing_challenger_change_nothing(client, register):
    decision = promote(client, NAME, "psnr", LOW)
    assert not decision.promoted and "challenger" in decision.reasons[0]
    register(None)  # registered but never evaluated
    decision = promote(client, NAME, "psnr", LOW)
    assert not decision.promoted and champion(client) is None
    assert any(r.startswith("psnr missing on version 1") for r in decision.reasons)


def test_explicit_version_and_already_champion(client, register):
    v1 = register(GOOD, challenger=False)
    assert promote(client, NAME, "psnr", LOW, version=v1).promoted
    again = promote(client, NAME, "psnr", LOW, version=v1)
    assert not again.promoted and "already the champion" in again.reasons[-1]


def test_model_card_and_evaluation_section(client, register):
    v = register(GOOD)
    description = client.get_model_version(NAME, v).description
    assert description.startswith(f"# {NAME} version {v}")
    assert "- source: synthetic" in description and "random init" in description and "abc123" in description
    assert description.count(EVAL_SECTION) == 1 and "| psnr | 20 |" in description
    tag_evaluation(client, NAME, v, {"psnr": 21.0}, {"split": "test"})  # a re-evaluation replaces the section
    mv = client.get_model_version(NAME, v)
    assert mv.description.count(EVAL_SECTION) == 1 and "| psnr | 21 |" in mv.description
    assert eval_metrics(mv.tags) == {"psnr": 21.0}  # stale eval.* tags of the earlier evaluation are gone
    card = model_card({"name": NAME, "params": {"lora": {"rank": 8}}, "metrics": {"val_psnr": 12.5}})
    assert "| lora.rank | 8 |" in card and "| val_psnr | 12.5 |" in card


def test_cli_prints_logs_and_writes_json(tmp_path, client, register, capsys):
    from gac.cli import main

    write_params(tmp_path)
    v = register(GOOD)
    out = tmp_path / "promote.json"
    assert main(["--params", str(tmp_path / "params.yaml"), "promote", "--metrics", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{NAME}: version {v} promoted to champion (first champion)" in printed
    assert "gac-stage3: nothing to promote" in printed
    decisions = json.loads(out.read_text())
    assert decisions[NAME]["promoted"] and decisions[NAME]["champion_after"] == v
    assert not decisions["gac-stage3"]["promoted"]
    runs = client.search_runs([client.get_experiment_by_name("gac").experiment_id])
    assert [r.info.run_name.split(" · ")[0] for r in runs] == ["promote"]
    assert runs[0].data.metrics[f"{NAME}.promoted"] == 1.0
    assert main(["--params", str(tmp_path / "params.yaml"), "promote", "--version", "1"]) == 2  # needs one --model


@pytest.fixture(scope="module")
def sample_tiles(sample_root, tmp_path_factory):
    """(s2 DN, s1 dB) of every tile of the real reBEN sample, through the project's own catalog."""
    from gac.config import CatalogParams
    from gac.data.catalog import build
    from gac.io.store import ShardStore

    out = tmp_path_factory.mktemp("gate") / "catalog"
    build(CatalogParams(out=str(out), workers=0), sample_root, progress=False)
    store = ShardStore(out)
    return store.read("s2"), store.read("s1")


def test_the_committed_targets_pass_a_perfect_model_and_fail_a_flat_one(client, register, sample_tiles):
    """The gate with params.yaml's own targets: an oracle (returns the truth) becomes champion; a model that returns
    each tile's per-band mean (no structure at all) is refused on every target."""
    import numpy as np
    import torch

    from gac import config
    from gac.evaluation import metrics

    targets = config.load(Path(__file__).parents[1] / "params.yaml").promote.targets
    s2, s1 = sample_tiles
    truth = torch.from_numpy(s2.astype(np.float32))
    flat = truth.mean(dim=(2, 3), keepdim=True).expand_as(truth).contiguous()
    oracle_scores = metrics.compute_all(truth, truth, torch.from_numpy(s1))
    flat_scores = metrics.compute_all(flat, truth, torch.from_numpy(s1))
    print(f"\noracle {oracle_scores}\nflat   {flat_scores}")

    flat_version = register({**flat_scores, "tiles": len(s2)})
    refused = promote(client, NAME, "psnr", targets)
    assert not refused.promoted and champion(client) is None
    for metric in ("psnr", "ssim", "sam_deg", "sar_edge"):
        assert any(r.startswith(f"{metric} ") and r.endswith("NOT met") for r in refused.reasons), refused.reasons
    assert refused.candidate == flat_version

    oracle_version = register({**oracle_scores, "tiles": len(s2)})
    decision = promote(client, NAME, "psnr", targets)
    assert decision.promoted and champion(client) == oracle_version
    assert all(r.endswith(": met") for r in decision.reasons if " target " in r), decision.reasons


# -- the Stage 2 + Stage 3 pair ----------------------------------------------------------------------------------------
S3 = "gac-stage3"


def trained_on(version: str) -> dict:
    """The lineage tags training writes on a Stage 3 version (:func:`gac.cli.train.lineage`)."""
    return {"gac.stage2_model": NAME, "gac.stage2_version": version}


def test_promoting_stage3_sets_stage2_champion_to_the_version_it_was_trained_on(client, register):
    first = register(GOOD)
    assert promote(client, NAME, "psnr", LOW).promoted  # Stage 2 alone: no Stage 3 champion pins it yet
    paired = register({**GOOD, "psnr": 15.0})  # worse than the Stage 2 champion on its own: the pair decides
    s3 = register(GOOD, name=S3, tags=trained_on(paired))
    decision = promote(client, S3, "psnr", LOW)
    assert decision.promoted and champion(client, S3) == s3
    assert champion(client, NAME) == paired and decision.paired_with == f"{NAME}/{paired}"
    assert f"pair: trained on {NAME} version {paired}: {NAME}@champion moves with it (was version {first})" in (
        decision.reasons
    )


@pytest.mark.parametrize(
    ("tags", "why"),
    [
        (None, f"names no {NAME} version it was trained on (no gac.stage2_version tag)"),
        (trained_on("7"), f"was trained on {NAME} version 7, which is not in the registry"),
        ({"gac.stage2_model": "artifacts/stage2/model"}, "trained on artifacts/stage2/model (gac.stage2_model)"),
    ],
)
def test_a_stage3_without_an_eligible_stage2_is_refused_in_one_line(client, register, tags, why):
    register(GOOD)
    promote(client, NAME, "psnr", LOW)
    register(GOOD, name=S3, tags=tags)  # meets every target: only the pair is missing
    decision = promote(client, S3, "psnr", LOW)
    assert not decision.promoted and champion(client, S3) is None and champion(client, NAME) == "1"
    pair_lines = [r for r in decision.reasons if r.startswith("pair: ")]
    assert len(pair_lines) == 1 and why in pair_lines[0] and pair_lines[0].endswith("not promoted"), pair_lines


def test_stage2_is_not_promoted_alone_while_a_stage3_champion_names_another(client, register):
    v1 = register(GOOD)
    register(GOOD, name=S3, tags=trained_on(v1))
    assert promote(client, S3, "psnr", LOW).promoted and champion(client, NAME) == v1
    better = register({**GOOD, "psnr": 25.0})  # beats the Stage 2 champion and meets every target
    decision = promote(client, NAME, "psnr", LOW)
    assert not decision.promoted and champion(client, NAME) == v1
    assert decision.reasons[-1] == (
        f"pair: {S3}@champion version 1 was trained on {NAME} version {v1}: "
        f"{NAME} is promoted with a {S3} version trained on its output, not alone"
    )
    register(GOOD, name=S3, tags=trained_on(better))  # ... and with one, the pair moves
    s3 = promote(client, S3, "ssim", LOW)  # same ssim as the champion: does not beat it, nothing moves
    assert not s3.promoted and champion(client, NAME) == v1 and champion(client, S3) == "1"
    moves = f"{NAME}@champion would move with it (was version {v1})"
    assert s3.reasons[-1] == f"pair: trained on {NAME} version {better}: {moves}"


def test_the_cli_moves_the_pair_and_infer_runs_the_stage2_that_stage3_names(tmp_path, client, register, capsys):
    import mlflow

    from gac.cli import main
    from gac.stages.infer import paired_stage2

    write_params(tmp_path)
    v1 = register(GOOD)
    client.set_registered_model_alias(NAME, "champion", v1)
    paired = register({**GOOD, "psnr": 12.0}, challenger=False)
    register({**GOOD, "psnr": 30.0})  # Stage 2's challenger: a better Stage 2, but no Stage 3 was trained on it
    s3 = register(GOOD, name=S3, tags=trained_on(paired))
    out = tmp_path / "promote.json"
    assert main(["--params", str(tmp_path / "params.yaml"), "promote", "--metrics", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{S3}: version {s3} promoted to champion (first champion)" in printed
    assert f"{NAME}: version {paired} promoted to champion (was version {v1})" in printed
    assert f"pair: set with {S3} version {s3}, which was trained on version {paired}'s output" in printed
    decisions = json.loads(out.read_text())
    assert decisions[NAME]["champion_after"] == paired and decisions[S3]["champion_after"] == s3

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.set_registered_model_alias(NAME, "champion", v1)  # whatever gac-stage2@champion says ...
    source, why = paired_stage2(f"models:/{S3}@champion")  # ... gac infer runs the Stage 2 Stage 3 was trained on
    assert source == f"models:/{NAME}/{paired}" and why == f"{S3} version {s3} was trained on {NAME} version {paired}"
    assert paired_stage2("artifacts/stage3/model")[0] == f"models:/{NAME}@champion"  # a folder names no Stage 2
