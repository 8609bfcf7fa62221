"""The real-world rehearsal (``make rehearse``) and the GPU device check, run here at tiny sizes so they cannot rot.

Both scripts run as a user runs them (subprocesses, the real CLI and DVC); the real sizes take 20 min (rehearsal)
and a GPU (device check), which is why the suite runs their ``--tiny`` form.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gac.config import parse

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rehearsal_keeps_the_gpu_configs_models_and_changes_only_what_a_cpu_forces() -> None:
    rehearse = _load("rehearse")
    gpu = parse(rehearse.yaml.safe_load(rehearse.GPU_CONFIG.read_text()))
    real = parse(rehearse.rehearsal_params(tiny=False))
    assert (real.stage1.variant, real.stage1.img_size, real.stage1.timesteps) == (
        gpu.stage1.variant, gpu.stage1.img_size, gpu.stage1.timesteps)  # fmt: skip
    assert real.stage1.mosaic and real.stage2.load_in_8bit
    assert (real.stage2.backbone, real.stage2.lora, real.stage3.variant, real.stage3.lora) == (
        gpu.stage2.backbone, gpu.stage2.lora, gpu.stage3.variant, gpu.stage3.lora)  # fmt: skip
    assert not (real.stage1.pretrained or real.stage2.pretrained or real.stage3.pretrained)  # nothing downloaded
    assert real.stage1.device == "cpu" and real.stage2.train.accelerator == "cpu"
    tiny = parse(rehearse.rehearsal_params(tiny=True))
    demo = parse(rehearse.yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert (tiny.stage1.variant, tiny.stage2.backbone, tiny.stage3.variant) == (
        demo.stage1.variant, demo.stage2.backbone, demo.stage3.variant)  # fmt: skip
    assert tiny.stage2.train.max_steps == real.stage2.train.max_steps  # only the models differ


@pytest.mark.slow
def test_the_rehearsal_runs_dvc_stages_in_a_throw_away_project_and_reports_each(tmp_path: Path) -> None:
    """Catalog, Stage 1 (mosaic over a 2 x 2 scene: the smallest with windows that overlap both ways) and Stage 2
    (int8 where the config says, LoRA) through ``dvc repro`` on 6 tiles; the project's own folder is not touched."""
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    cmd = [sys.executable, str(BENCHMARKS / "rehearse.py"), "--tiny", "--tiles", "6", "--scene-side", "2",
           "--stages", "catalog", "stage1", "stage2", "--json", str(tmp_path / "rehearsal.json"),
           "--dir", str(tmp_path / "project")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"rehearsal: tiny sizes end to end ok, peak RSS \d+\.\d GB, slowest stage \w+ \d+\.\d\d s/tile",
                        last), last  # fmt: skip
    rows = {r["stage"]: r for r in json.loads((tmp_path / "rehearsal.json").read_text())}
    assert list(rows) == ["data", "catalog", "stage1", "stage2"]
    assert rows["stage1"]["trainable"] == 0 < rows["stage1"]["params"]  # the generator is not trained
    assert 0 < rows["stage2"]["trainable"] < rows["stage2"]["params"] / 5  # LoRA: a small share
    assert all(r["peak_rss_gb"] > 0 and r["seconds"] > 0 for r in rows.values())
    assert rows["stage1"]["gflop_per_tile"] > rows["stage2"]["gflop_per_tile"] > 0  # 1 diffusion model vs 1 ViT step
    project = tmp_path / "project"
    stage1 = json.loads((project / "metrics" / "stage1.json").read_text())
    assert stage1["processed"] == rows["catalog"]["tiles"] == 6 and stage1["errors"] == 0
    assert (project / "dvc.lock").is_file() and "rehearsal-logs" in {p.name for p in project.iterdir()}
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before


@pytest.mark.slow
def test_the_device_check_runs_every_check_on_a_cpu_at_tiny_sizes(tmp_path: Path) -> None:
    from gac.evaluation import metrics
    from gac.inference import engine

    out = tmp_path / "device_check.json"
    cmd = [sys.executable, str(BENCHMARKS / "device_check.py"), "--device", "cpu", "--tiny", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"device_check: all 5 checks ok on cpu; written to {out}"
    result = json.loads(out.read_text())
    checks = result["checks"]
    assert list(checks) == ["stage1", "stage2", "stage3", "cache_engine", "torchrun"]
    assert all(c["ok"] and c["seconds"] > 0 and c["peak_gb"] > 0 for c in checks.values())
    assert checks["stage1"]["tiles_per_s"] > 0 and checks["stage1"]["mosaic_tiles_per_s"] > 0
    # Stage 1 ran benchmarks/stage1_throughput.py's own run(): precision auto, its operator profile, bf16 against fp32
    # where bf16 is native, and the benchmark's last line
    native = engine.native_bf16(engine.resolve_device("cpu"))
    name = "bf16" if native else "fp32"
    assert checks["stage1"]["precision"] == ("bf16" if native else "32")
    quality = r"\d+\.\d dB" if native else r"n/a \(no native bf16\)"
    line = checks["stage1"]["line"]
    assert re.fullmatch(rf"stage1 cpu: {name} \d+\.\d\d s/tile with mosaic, batched \d+ % of the {name} matmul peak, "
                        rf"bf16 vs fp32 PSNR {quality}", line), line  # fmt: skip
    assert any("Self CPU" in row for row in checks["stage1"]["profile"])  # torch.profiler's table by operator
    assert any(row.strip().startswith("aten::") for row in checks["stage1"]["profile"])
    if native:  # bf16 really ran: its opt_v1 is not fp32's (that would be PSNR_MAX_DB, the cap of identical tiles)
        assert 0 < checks["stage1"]["bf16_vs_fp32"]["psnr"] < metrics.PSNR_MAX_DB
    # the fast path (weights cast once; NCHW but on AMX) against the batched path as it ran before, side by side
    fast, before = checks["stage1"]["fast_path"], checks["stage1"]["fast_vs_before"]
    assert (fast["precast"] > 0) == (name == "bf16") and before["speedup"] > 0
    assert before["identical"] == (fast["layout"] == "contiguous")
    for stage in ("stage2", "stage3"):
        assert checks[stage]["steps"] == 2 and checks[stage]["s_per_step"] > 0
        assert 0 < checks[stage]["trainable"] < checks[stage]["params"]
    assert checks["stage2"]["int8"] and checks["cache_engine"]["num_workers"] == 2
    assert checks["torchrun"]["backend"] == "gloo" and checks["torchrun"]["metrics"]["errors"] == 0
    assert checks["torchrun"]["metrics"]["processed"] == checks["cache_engine"]["tiles"]
    assert result["unreached"] and result["goals"]["stage2_peak_gb"] == 3.0
