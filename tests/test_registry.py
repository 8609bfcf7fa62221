"""A registered version stands alone: its code, exact requirements, digest, model card and description.

The model is a real Stage 3 model folder (:func:`gac.training.export.save_model` of a freshly built, random-init
grounder with a σ head (``nll_weight > 0``) whose zero-initialised pixel and σ heads are given random weights, so it
does not return its input and its σ varies, and whose σ temperature is not 1, so the calibration must travel with
it: training is covered in test_training.py), logged and registered by :func:`gac.mlops.registry.log_and_register`
in a real MLflow store (SQLite in tmp_path). The stand-alone test loads it in a subprocess where the project cannot be
imported from the repository or the venv's editable install, only from the model's own ``code/``, and compares its
prediction (mean and σ) on a varied input with the in-process model's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gac.config import MlflowParams, Stage3Params
from gac.sensors import DN_SCALE

ROOT = Path(__file__).resolve().parents[1]
NAME = "gac-stage3"
#: How far the registered model's prediction may be from the in-process model's: one DN (reflectance 1/DN_SCALE), the
#: resolution of every output GAC stores (uint16 DN, gac.inference.engine.to_dn). Both run the same float32 network
#: on the same CPU, at most in another summation order (another thread count): a float32 reduction of K terms is off by
#: at most ~K·eps32 of its magnitude, 768·1.2e-7 ≈ 0.9e-4 for TerraMind tiny's widest (MLP) layer at |y| ≤ 1.
ONE_DN = 1 / DN_SCALE
#: Run in the subprocess: make ``gac`` unimportable (editable-install finder, repository paths), prove it, then load
#: the registry model, predict on the input in argv[4] (.npz) into argv[5] (.npy) and report what ran.
STANDALONE = r"""
import importlib, importlib.util, json, os, sys

root = os.path.realpath(sys.argv[1])
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
venv = os.path.realpath(sys.prefix)

def outside_the_project(entry):
    path = os.path.realpath(entry or os.getcwd())
    return path.startswith(venv + os.sep) or not (path == root or path.startswith(root + os.sep))

sys.path[:] = [p for p in sys.path if outside_the_project(p)]
sys.path_importer_cache.clear()
importlib.invalidate_caches()
assert importlib.util.find_spec("gac") is None, importlib.util.find_spec("gac")

import mlflow
import numpy as np

mlflow.set_tracking_uri(sys.argv[2])
model = mlflow.pyfunc.load_model(sys.argv[3])
with np.load(sys.argv[4]) as inputs:
    y = model.predict({key: inputs[key] for key in ("s1", "opt")})
np.savez(sys.argv[5], **(y if isinstance(y, dict) else {"opt": y}))
import gac

outputs = model.metadata.get_output_schema().input_names()
print(json.dumps({"gac": gac.__file__, "example": {k: list(v.shape) for k, v in model.input_example.items()},
                  "outputs": outputs}))
"""


def varied_input(seed: int = 0) -> dict[str, np.ndarray]:
    """One tile of independent uniform noise per pixel and band: σ⁰ in [-25, 0] dB, reflectance in [0, 0.4] (the
    ranges of land in S1 GRD and S2 L2A). Unlike the signature's constant example, every pixel differs."""
    rng = np.random.default_rng(seed)
    return {
        "s1": rng.uniform(-25.0, 0.0, (1, 2, 120, 120)).astype(np.float32),
        "opt": rng.uniform(0.0, 0.4, (1, 12, 120, 120)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path, non_identity) -> dict:
    """A random-init Stage 3 model folder (pixel head not zero: not the identity), registered ``gac-stage3@challenger``
    with the lineage tags of training; ``model`` is the in-process model it was saved from."""
    import mlflow
    import torch

    from gac.io import tracking
    from gac.mlops.registry import log_and_register
    from gac.models.grounding import build_grounder
    from gac.training.export import save_model

    tmp = tmp_path_factory.mktemp("registry")
    shutil.copyfile(empty_mlflow_db, tmp / "mlflow.db")
    store = MlflowParams(tracking_uri=f"sqlite:///{tmp}/mlflow.db", artifact_location=str(tmp / "mlartifacts"))
    section = Stage3Params(img_size=128, nll_weight=0.05)
    torch.manual_seed(0)
    model = non_identity(build_grounder(section)).eval()
    model.sigma_head.temperature.copy_(torch.linspace(0.5, 2.0, 12))  # as a calibration leaves it
    model_dir = save_model("stage3", section, model, tmp / "model")
    tracking.setup(store)
    with mlflow.start_run():
        version = log_and_register(str(model_dir), section, {"val/psnr": 12.5}, tags={
            "gac.data": "synthetic", "gac.stage2_model": "gac-stage2", "gac.stage2_version": "4"})  # fmt: skip
    client = mlflow.MlflowClient(store.tracking_uri)
    return {"tmp": tmp, "store": store, "version": version, "client": client, "model_dir": model_dir, "model": model}


def test_a_registered_version_predicts_what_the_in_process_model_does_where_gac_is_not_importable(
    registered: dict, tmp_path: Path
) -> None:
    """Only the model's own code/ and its requirements: no repository on sys.path, no editable-install finder; and
    what it predicts is the in-process model's output (within :data:`ONE_DN`), which is far from its input."""
    import torch

    from gac.training.export import apply_with_sigma

    x = varied_input()
    np.savez(tmp_path / "x.npz", **x)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {"OMP_NUM_THREADS": "1"}
    uri = registered["store"].tracking_uri
    done = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(ROOT), uri, f"models:/{NAME}@challenger", tmp_path / "x.npz",
         tmp_path / "y.npz"],
        cwd=registered["tmp"], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    ran = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(ran["gac"]).parts[-3:] == ("code", "gac", "__init__.py"), ran["gac"]  # the model's code ran
    assert not Path(ran["gac"]).resolve().is_relative_to(ROOT)
    assert ran["example"] == {"s1": [1, 2, 120, 120], "opt": [1, 12, 120, 120]}
    assert ran["outputs"] == ["opt", "sigma"]  # the signature says the model returns the mean and its σ
    with np.load(tmp_path / "y.npz") as out:
        y, sigma = out["opt"], out["sigma"]
    assert y.shape == sigma.shape == (1, 12, 120, 120) and y.dtype == sigma.dtype == np.float32
    assert 0.0 <= y.min() <= y.max() <= 1.0  # reflectance, as the signature and the card say
    assert sigma.min() > 0
    with torch.inference_mode():
        expected, expected_sigma = (
            t.numpy() for t in apply_with_sigma("stage3", registered["model"], *map(torch.from_numpy, x.values()))
        )
    moved, worst = float(np.median(np.abs(expected - x["opt"]))), float(np.abs(y - expected).max())
    assert moved > 20 * ONE_DN, moved  # not the identity: most pixels move by far more than the tolerance
    assert worst <= ONE_DN, worst
    # σ: the same within 1 DN, and calibrated (the temperature travelled): it varies as the in-process σ does
    assert float(np.abs(sigma - expected_sigma).max()) <= ONE_DN
    assert float(np.percentile(expected_sigma, 90) / np.percentile(expected_sigma, 10)) > 1.5


def test_the_registered_requirements_are_exact_and_name_no_gac(registered: dict) -> None:
    import mlflow

    from gac.mlops.registry import model_code, pip_requirements, third_party_imports

    mlflow.set_tracking_uri(registered["store"].tracking_uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{registered['version']}"))
    lines = [line for line in (folder / "requirements.txt").read_text().splitlines() if line.strip()]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s=]+", line) for line in lines), lines
    names = {line.split("==")[0].lower() for line in lines}
    assert "gac" not in names  # PyPI's gac is an unrelated project: the code travels in code/ instead
    required = {"torch", "terratorch", "peft", "bitsandbytes", "safetensors", "numpy", "mlflow", "pydantic", "pyyaml"}
    assert required <= names, required - names
    assert lines == pip_requirements()
    # every package the shipped code imports is pinned (the list is derived from that code: nothing can go missing)
    files = model_code()
    shipped = {p.relative_to(folder / "code").as_posix() for p in (folder / "code" / "gac").rglob("*.py")}
    assert shipped == set(files)
    assert {"gac/training/export.py", "gac/models/grounding.py", "gac/models/prithvi.py"} <= shipped
    not_run = {"gac/evaluation/ablation.py", "gac/training/fit.py", "gac/mlops/promote.py"}  # not what a model runs
    assert not not_run & shipped
    assert len(third_party_imports(files)) == len(lines)


def test_the_digest_covers_the_shipped_code_the_requirements_and_the_model(registered: dict, tmp_path: Path) -> None:
    from gac.mlops.registry import CONTENT_TAG, content_digest, model_code, pip_requirements

    files, requirements = model_code(), pip_requirements()
    model_dir = registered["model_dir"]
    digest = content_digest(model_dir)
    version = registered["client"].get_model_version(NAME, registered["version"])
    assert version.tags[CONTENT_TAG] == digest == content_digest(model_dir, files, requirements)
    changed = tmp_path / "heads.py"  # one shipped module with one more line
    changed.write_bytes(files["gac/models/heads.py"].read_bytes() + b"\n")
    assert content_digest(model_dir, files | {"gac/models/heads.py": changed}, requirements) != digest
    assert content_digest(model_dir, files, [*requirements[:-1], requirements[-1] + ".post1"]) != digest
    params = tmp_path / "model"
    shutil.copytree(model_dir, params)
    (params / "params.json").write_text((params / "params.json").read_text().replace("128", "256"))
    assert content_digest(params, files, requirements) != digest


def test_the_card_and_description_say_the_units_of_the_signature(registered: dict) -> None:
    client = registered["client"]
    card = client.get_model_version(NAME, registered["version"]).description
    assert "L2A DN" not in card
    assert "reflectance in [0, 1]" in card and "σ⁰ in dB" in card and "here opt_v2" in card and "here opt_v3" in card
    assert "a dict of two arrays out" in card and "- output `sigma`: " in card  # this model returns its σ too
    # a regex's | must not end a table cell: every row of every table has exactly three cell borders
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    assert rows and all(len(re.findall(r"(?<!\\)\|", row)) == 3 for row in rows), rows
    assert any(row.startswith("| lora.target_modules |") and r"(q\|kv\|proj)" in row for row in rows), rows
    description = client.get_registered_model(NAME).description
    assert description.startswith(f"# {NAME}\n") and "reflectance in [0, 1]" in description
    assert "`@challenger`" in description and "`@champion`" in description and "gac.stage2_version" in description


def test_in_process_the_model_warns_when_the_imported_gac_differs_from_its_code(tmp_path: Path) -> None:
    """``gac infer`` loads registry models in a process that has imported gac: a mismatch must not pass silently."""
    import warnings

    from gac.mlops.registry import model_code
    from gac.mlops.registry_model import _warn_if_other_code

    shipped = tmp_path / "code" / "gac"
    for rel, path in model_code().items():
        (tmp_path / "code" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp_path / "code" / rel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_other_code(shipped)  # the same code: silent
    (shipped / "models" / "heads.py").write_text("# another version\n")
    with pytest.warns(UserWarning, match=r"differs from the code this model was registered with in models/heads\.py"):
        _warn_if_other_code(shipped)
