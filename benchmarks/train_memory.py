"""Peak memory of one Stage 2 training step: full fine-tuning vs LoRA vs LoRA + int8 base, side by side.

Every configuration trains the same Prithvi-EO refiner on the same batch through the same loss. On CUDA the peak is
``torch.cuda.max_memory_allocated`` (reset between configurations, same process). On the CPU a process's peak RSS
cannot be reset, so each configuration runs in a fresh subprocess and reports its peak RSS above the RSS it had once
the model was built (what the *step* costs: activations, gradients, optimiser state) and the total peak.

    python benchmarks/train_memory.py                                   # here: tiny Prithvi, CPU
    python benchmarks/train_memory.py --backbone prithvi_eo_v2_300_tl --batch-size 1 --device cuda   # the seed's bound
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CONFIGS = {
    "full fine-tune": {"lora": False, "int8": False},
    "LoRA": {"lora": True, "int8": False},
    "LoRA + int8 base": {"lora": True, "int8": True},
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(backbone: str, batch: int, img_size: int, steps: int, device: str, lora: bool, int8: bool) -> dict:
    """Build, then train ``steps`` steps; return peak memory figures in MB."""
    import torch

    from gac.config import Stage2Params
    from gac.models.prithvi import build_refiner, trainable_report

    torch.manual_seed(0)
    p = Stage2Params(backbone=backbone, img_size=img_size, load_in_8bit=int8)
    model = build_refiner(p, device=device).to(device)  # int8 is quantised on the device itself
    if not lora:  # full fine-tuning of the same network, for comparison
        for name, p in model.named_parameters():
            p.requires_grad_(p.is_floating_point() and "lora_" not in name)
    report = trainable_report(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.rand(batch, 12, 120, 120, device=device) * 0.3
    target = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    for _ in range(steps):
        loss = torch.nn.functional.l1_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mb()
    return {"trainable": report["trainable"], "total": report["total"], "model_mb": before, "peak_mb": peak,
            "step_mb": peak - before}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="prithvi_eo_v2_tiny_tl")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration, print JSON
    args = parser.parse_args()
    common = (args.backbone, args.batch_size, args.img_size, args.steps, args.device)
    if args.one:
        print(json.dumps(measure(*common, **CONFIGS[args.one])))
        return
    rows = {}
    for name, cfg in CONFIGS.items():
        if args.device.startswith("cuda"):
            rows[name] = measure(*common, **cfg)
        else:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", name], capture_output=True,
                                 text=True, check=True)  # fmt: skip
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    unit = "GPU allocated" if args.device.startswith("cuda") else "process RSS"
    print(f"Stage 2 training step, {args.backbone}, batch {args.batch_size}, {args.img_size}px, {args.device} ({unit})")
    print(f"{'configuration':<18} {'trainable':>12} {'share':>7} {'model MB':>9} {'peak MB':>9} {'step MB':>9}")
    base = rows["full fine-tune"]
    for name, r in rows.items():
        print(f"{name:<18} {r['trainable']:>12,} {r['trainable'] / r['total']:>7.1%} {r['model_mb']:>9.0f} "
              f"{r['peak_mb']:>9.0f} {r['step_mb']:>9.0f}")  # fmt: skip
    for name in ("LoRA", "LoRA + int8 base"):
        print(f"peak ratio {name} / full fine-tune: {rows[name]['peak_mb'] / base['peak_mb']:.2f}; "
              f"step ratio: {rows[name]['step_mb'] / max(base['step_mb'], 1e-9):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
