"""The ``evaluate`` stage: score the ablation (:mod:`gac.evaluation.ablation`), then tell the registry.

Scoring is evaluation's job and knows nothing of the registry; this stage adds what makes the result reach users:
``eval.<metric>`` tags and an updated model card on every registered version whose cache was scored.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gac.config import Params
from gac.evaluation import ablation
from gac.evaluation.metrics import DN_SCALE
from gac.io.lock import exclusive
from gac.mlops.model_card import tag_evaluation
from gac.stages.infer import load_stage


def run_pipeline(cfg: Params, metrics_path: str | Path | None = None) -> dict[str, Any]:
    """The DVC stage: score the pipeline's own caches on ``cfg.evaluate.split`` into ``cfg.evaluate.out`` (holding
    its lock), with Stage 3's attention maps when its model folder exists; the headline metrics go to ``metrics_path``
    (default ``<evaluate.out>.metrics.json``; the DVC entry point passes ``metrics/evaluate.json``)."""
    with exclusive(cfg.evaluate.out):
        attention = attention_hook(f"{cfg.stage3.out}/model")
        return run(cfg, cfg.evaluate.out, metrics_path=metrics_path, attention_maps=attention)


def run(
    cfg: Params,
    out_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    attention_maps: ablation.AttentionMaps | None = None,
    verbose: bool = True,
    baseline_catalog: str | Path | None = None,
    run_detail: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`gac.evaluation.ablation.evaluate` with the same arguments, then :func:`tag_versions`."""
    result = ablation.evaluate(cfg, out_dir, metrics_path, attention_maps, verbose, baseline_catalog, run_detail,
                               run_tags)  # fmt: skip
    tagged = tag_versions(cfg, result)
    if verbose and tagged:
        print(f"Tagged eval.* on {', '.join(tagged)}")
    return result


def tag_versions(cfg: Params, result: dict[str, Any]) -> list[str]:
    """Write each scored row's figures as ``eval.*`` tags on the registered version that made its cache.

    Returns ``name/version`` of each version tagged. A cache made by a version since deleted is reported and
    skipped: the evaluation itself stands.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    caches = ablation.open_caches(cfg)
    provenance = result["provenance"]
    context = {"split": provenance["split"], "data_source": provenance["data_source"],
               "run_id": provenance["mlflow_run_id"]}  # fmt: skip
    client = mlflow.MlflowClient()
    tagged = []
    for row, stage in ablation.ROWS.items():
        if stage is None or row not in result or caches[stage].registered is None:
            continue
        name, version = caches[stage].registered
        try:
            tag_evaluation(client, name, version, result[row], context)
        except MlflowException as e:
            print(f"warning: cannot tag {name} version {version}: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        tagged.append(f"{name}/{version}")
    return tagged


def attention_hook(source: str):
    """Stage 3's cross-attention maps (share of attention on SAR tokens) as evaluate's hook, from a ``models:/…``
    URI or a model folder; ``None`` for a folder without weights."""
    if not source.startswith(("models:/", "runs:/")) and not Path(source, "weights.safetensors").is_file():
        return None
    import torch

    _, _, model = load_stage(source)
    model = model.cpu().eval()

    def maps(s1_db, opt_v2_dn):
        s1 = torch.as_tensor(s1_db, dtype=torch.float32)
        opt = torch.as_tensor(opt_v2_dn, dtype=torch.float32) / DN_SCALE
        with torch.inference_mode():
            return model.cross_attention_maps(s1, opt).numpy()

    return maps
