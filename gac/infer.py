"""The whole pipeline on new tiles: catalog → Stage 1 → Stage 2 → Stage 3, from registry aliases or model folders.

Models come from the MLflow registry (``models:/gac-stage2@champion``; loaded as code + safetensors, see
:mod:`gac.registry_model`) or from local model folders (``artifacts/stage2/model``). Every stage writes its usual
cache under the output folder, so a run can be inspected, evaluated or exported tile by tile.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gac.config import Params


def load_stage(source: str) -> tuple[str, torch.nn.Module]:
    """``(stage, model)`` from a ``models:/…`` URI or a local model folder."""
    if source.startswith("models:/") or source.startswith("runs:/"):
        import mlflow

        pyfunc = mlflow.pyfunc.load_model(source)
        wrapped = pyfunc.unwrap_python_model()
        return wrapped.stage, wrapped.model
    from gac.training.export import load_model

    stage, _, model = load_model(source)
    return stage, model


def run(cfg: Params, data: str, out: str | Path, stage2: str, stage3: str, visualize: int = 0) -> dict:
    """Run every stage on ``data`` (a BigEarthNet v2 root or a catalog folder) into ``out``; return the caches."""
    from gac import config, stage1
    from gac.data import catalog as catalog_mod
    from gac.refine import write_cache
    from gac.store import ShardStore

    out = Path(out)
    if (Path(data) / "metadata.parquet").is_file():  # a raw BigEarthNet v2 root: build its catalog first
        section = config.override(cfg.catalog, out=str(out / "catalog"))
        catalog_mod.build(section, data)
        catalog_root = section.out
    else:
        catalog_root = data
        ShardStore(catalog_root).index  # noqa: B018 - fails early with a clear line if it is not a store
    caches = {"catalog": catalog_root, "opt_v1": str(out / "opt_v1")}
    report = stage1.run(config.override(cfg.stage1, out=caches["opt_v1"]), catalog_root)
    print(report.summary_line())
    source = caches["opt_v1"]
    for name, uri in (("opt_v2", stage2), ("opt_v3", stage3)):
        stage, model = load_stage(uri)
        caches[name] = str(out / name)
        write_cache(stage, model, catalog_root, source, caches[name], provenance={"model": uri})
        source = caches[name]
    if visualize:
        from gac.stage1 import export_geotiff

        ids = ShardStore(source).index["patch_id"].head(visualize)
        for pid in ids:
            export_geotiff(source, pid, out / "geotiff" / f"{pid}_opt_v3.tif")
    return caches
