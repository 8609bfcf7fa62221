"""Gated promotion against a real MLflow registry (SQLite in tmp_path): targets, champion comparison, model cards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gac.config import TargetParams
from gac.promote import (
    EVAL_SECTION,
    describe_version,
    eval_metrics,
    model_card,
    promote,
    tag_evaluation,
)

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

    def make(metrics: dict | None, challenger: bool = True, name: str = NAME) -> str:
        try:
            client.get_registered_model(name)
        except Exception:
            client.create_registered_model(name)
        version = str(client.create_model_version(name, source=str(source)).version)
        describe_version(client, name, version, {"name": name, "version": version, "stage": "stage2",
                                                 "data": "synthetic", "weights_origin": "random init",
                                                 "git_commit": "abc123"})  # fmt: skip
        if metrics is not None:
            tag_evaluation(client, name, version, metrics, {"split": "test", "data_source": "synthetic"})
        if challenger:
            client.set_registered_model_alias(name, "challenger", version)
        return version

    return make


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

    db = tmp_path / "mlflow.db"
    (tmp_path / "params.yaml").write_text(
        f"mlflow: {{tracking_uri: 'sqlite:///{db}', artifact_location: '{tmp_path / 'artifacts'}'}}\n"
        "promote:\n  objective: psnr\n  targets: {psnr: 10.0, ssim: 0.1, sam_deg: 60.0, sar_edge: 0.9}\n"
    )
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
    from gac.store import ShardStore

    out = tmp_path_factory.mktemp("gate") / "catalog"
    build(CatalogParams(out=str(out), workers=0), sample_root, progress=False)
    store = ShardStore(out)
    return store.read("s2"), store.read("s1")


def test_the_committed_targets_pass_a_perfect_model_and_fail_a_flat_one(client, register, sample_tiles):
    """The gate with params.yaml's own targets: an oracle (returns the truth) becomes champion; a model that returns
    each tile's per-band mean (no structure at all) is refused on every target."""
    import numpy as np
    import torch

    from gac import config, metrics

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
