"""``gac evaluate``: the ablation over a split, with pictures, GeoTIFFs and registry tags (see :mod:`gac.evaluate`)."""

from __future__ import annotations

import argparse

from gac.commands import params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=["train", "validation", "test"], help="split to score (default: evaluate.split)")
    p.add_argument("--output-dir", help="plots, figures and GeoTIFFs folder, replaced (default: evaluate.out)")
    p.add_argument("--metrics", default="metrics/evaluate.json", help="metrics JSON for dvc (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    from gac import config
    from gac.evaluate import evaluate

    cfg = params(args)
    section = config.override(cfg.evaluate, split=args.split, out=args.output_dir)
    evaluate(
        cfg.model_copy(update={"evaluate": section}),
        section.out,
        metrics_path=args.metrics,
        attention_maps=stage3_attention(f"{cfg.stage3.out}/model"),
    )


def stage3_attention(model_dir: str):
    """Stage 3's cross-attention maps (share of attention on SAR tokens) as evaluate's hook, if the model exists."""
    from pathlib import Path

    if not Path(model_dir, "weights.safetensors").is_file():
        return None
    import torch

    from gac.metrics import DN_SCALE
    from gac.training.export import load_model

    _, _, model = load_model(model_dir)

    def maps(s1_db, opt_v2_dn):
        s1 = torch.as_tensor(s1_db, dtype=torch.float32)
        opt = torch.as_tensor(opt_v2_dn, dtype=torch.float32) / DN_SCALE
        with torch.inference_mode():
            return model.cross_attention_maps(s1, opt).numpy()

    return maps
