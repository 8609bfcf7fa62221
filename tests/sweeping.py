"""What the sweep tests share: a catalog and an opt_v1 cache of synthetic tiles, and params and commands of cheap
sweeps (1 optimizer step on 2 tiles per trial: real training through the stage's own code, made small)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gac.config import CatalogParams, Params
from gac.data import synthetic
from gac.data.catalog import build
from gac.io.store import ShardStore


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """A catalog of synthetic tiles and an opt_v1 cache standing in for Stage 1's.

    opt_v1 is the truth blurred and offset (Stage 1's own tests cover TerraMind generation); the sweep only needs a
    cache in the real format to train on.
    """
    tmp = tmp_path_factory.mktemp("sweep-data")
    synthetic.generate(tmp / "raw", 9, seed=3)
    catalog = build(CatalogParams(out=str(tmp / "catalog"), workers=0), tmp / "raw", progress=False)
    assert catalog.tiles == 9
    cat = ShardStore(tmp / "catalog")
    s2 = cat.read("s2").astype(np.float32)
    degraded = (0.5 * s2 + 0.5 * s2.mean(axis=(2, 3), keepdims=True) + 150).clip(0, 65535).astype(np.uint16)
    opt = ShardStore(tmp / "opt_v1")
    opt.write_shard("00000", cat.index.drop(columns=["shard", "row"]), {"opt": degraded})
    opt.finalize()
    return {"catalog": str(tmp / "catalog"), "opt_v1": str(tmp / "opt_v1")}


def sweep_params(tmp: Path, stores: dict[str, str], storage: str, n_trials: int) -> Path:
    raw = Params().model_dump()
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "artifact_location": str(tmp / "mlartifacts"),
                     "experiment": "gac"}  # fmt: skip
    raw["catalog"]["out"] = stores["catalog"]
    raw["stage1"]["out"] = stores["opt_v1"]
    train = raw["stage2"]["train"]
    train.update(max_steps=1, batch_size=2, max_tiles=2, val_every_n_steps=1, save_every_n_steps=1, epochs=1)
    raw["stage2"]["img_size"] = 128
    raw["sweep"].update(storage=storage, n_trials=n_trials, out=str(tmp / "sweep"), study="test-study")
    raw["sweep"]["space"]["lora_rank"] = [2, 4]
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_cmd(params: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gac", "--params", str(params), "sweep", "--metrics", str(params.parent / "s.json"),
            *extra]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GAC_PROGRESS": "0"}


def trials_of(storage: str, study: str = "test-study"):
    import optuna

    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
