"""What each source of σ costs, in FLOPs per tile, for the demo's models and for the real config's.

Counted with ``torch.utils.flop_counter`` over one tile's inference, as the cache writers run it (float32 graph):

* Stage 1, one diffusion draw (``stage1.samples: K`` runs ``K`` of them: ``K − 1`` more than today);
* Stage 2 and Stage 3 without and with the σ head (``nll_weight > 0``): the head's own FLOPs (aleatoric σ);
* Stage 2's fold spread (``cross_fit_spread`` with ``cross_fit_folds: k``): ``k`` more Stage 2 passes per tile.

The calibration itself is one more inference pass over the validation split after training (no FLOPs per scored
tile). Training costs are not counted here: the σ head's backward is its forward's ~2×, on the head alone (its input
is detached).

    python benchmarks/uncertainty_cost.py [--real] [--samples 4] [--folds 5]

The last line is ``uncertainty cost: <config>: stage1 ×K +<g> GFLOP, σ heads +<h> %, fold spread ×k +<f> GFLOP per
tile``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def measure(params: dict) -> dict[str, float]:
    """GFLOP per tile of one Stage 1 draw and of Stage 2/3 inference without and with the σ head."""
    import torch

    from gac.config import parse
    from gac.inference import generate as stage1
    from gac.models import grounding, prithvi
    from gac.models.terramind import build_generator
    from gac.training.export import apply_with_sigma

    for stage in ("stage1", "stage2", "stage3"):  # random weights: the FLOPs are the same, nothing is downloaded
        params[stage].update(pretrained=False, ckpt_path=None)
    cfg = parse(params)
    torch.manual_seed(0)
    s1 = torch.randn(1, 2, 120, 120) - 12.0
    opt = torch.rand(1, 12, 120, 120) * 0.3
    out = {"stage1": flops(lambda: stage1.generate(build_generator(cfg.stage1), s1, cfg.stage1, torch.device("cpu")))}
    builds = {"stage2": lambda p: prithvi.build_refiner(p.model_copy(update={"load_in_8bit": False})),
              "stage3": grounding.build_grounder}  # fmt: skip
    for stage, build in builds.items():
        section = getattr(cfg, stage)
        for label, weight in (("", 0.0), ("_sigma", max(section.nll_weight, 0.05))):
            model = build(section.model_copy(update={"nll_weight": weight})).eval()
            with torch.inference_mode():
                out[stage + label] = flops(lambda m=model, s=stage: apply_with_sigma(s, m, s1, opt))
            del model
    return {k: v / 1e9 for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="configs/bigearthnet-gpu.yaml's models instead of the demo's")
    ap.add_argument("--samples", type=int, default=4, help="K of stage1.samples in the summary line")
    ap.add_argument("--folds", type=int, default=5, help="k of cross_fit_folds in the summary line")
    args = ap.parse_args(argv)
    path = ROOT / ("configs/bigearthnet-gpu.yaml" if args.real else "params.yaml")
    g = measure(yaml.safe_load(path.read_text()))
    base = g["stage1"] + g["stage2"] + g["stage3"]
    heads = g["stage2_sigma"] + g["stage3_sigma"] - g["stage2"] - g["stage3"]
    print(f"{path.relative_to(ROOT)}: GFLOP per tile (inference)")
    print(f"  stage1 one draw {g['stage1']:10.2f}   stage2 {g['stage2']:8.2f} (+σ head {g['stage2_sigma']:8.2f})"
          f"   stage3 {g['stage3']:8.2f} (+σ head {g['stage3_sigma']:8.2f})")  # fmt: skip
    print(f"  the three stages, no σ: {base:.2f}")
    print(f"  aleatoric σ (both heads): +{heads:.2f} GFLOP (+{100 * heads / base:.2f} %)")
    extra_draws = (args.samples - 1) * g["stage1"]
    print(f"  stage1.samples K: +(K − 1) × {g['stage1']:.2f}; K = {args.samples}: +{extra_draws:.2f}")
    print(f"  cross_fit_spread, k folds: +k × {g['stage2_sigma']:.2f}; k = {args.folds}: "
          f"+{args.folds * g['stage2_sigma']:.2f}")  # fmt: skip
    print(f"uncertainty cost: {path.name}: stage1 ×{args.samples} +{extra_draws:.1f} GFLOP, "
          f"σ heads +{100 * heads / base:.2f} %, fold spread ×{args.folds} +{args.folds * g['stage2_sigma']:.1f} GFLOP "
          "per tile")  # fmt: skip


if __name__ == "__main__":
    main()
