"""The house rules that keep the package readable, checked: layers, one stage table, one params source, one flag
table."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from gac.cli import build_parser
from gac.cli.flags import FLAGS, apply, field_info, passed
from gac.config import Params

ROOT = Path(__file__).resolve().parents[1]
#: A stage's name written as a string: it belongs in the stage table (gac/pipeline.py) only.
STAGE_LITERAL = re.compile(r"""["'](stage[123]|gac-stage[23])["']""")
#: Params whose committed value differs from the code's default, and why (everything else must agree).
DEMO_OVERRIDES = {
    # The demo trains the 21-tile sample for 4 epochs, validating and checkpointing every 2 steps with 2 warm-up
    # steps; the code's defaults are the budget of a new section and of the tests' tiny fits.
    f"{stage}.train.{key}": why
    for stage in ("stage2", "stage3")
    for key, why in {"epochs": "demo budget", "patience": "demo budget", "val_every_n_steps": "demo cadence",
                     "save_every_n_steps": "demo cadence", "warmup_steps": "demo schedule"}.items()
} | {
    # The demo predicts σ (a σ head beside the mean); the code's default 0 builds none: the model, its outputs and
    # fingerprints of every section that does not ask for σ stay as they were.
    f"{stage}.nll_weight": "demo predicts σ" for stage in ("stage2", "stage3")
}  # fmt: skip


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_no_stage_name_literal_outside_the_stage_table() -> None:
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted((ROOT / "gac").rglob("*.py")) if path.name != "pipeline.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if STAGE_LITERAL.search(line)]  # fmt: skip
    assert not found, "stage names belong in gac/pipeline.py:\n" + "\n".join(found)


def test_imports_only_point_down_the_layers() -> None:
    """The import-linter contract in pyproject.toml (``lint-imports``), run as ``make test`` runs it."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports is a dev requirement (requirements-dev.txt)"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_params_file_and_typed_params_have_the_same_keys_and_defaults() -> None:
    committed = flat(yaml.safe_load((ROOT / "params.yaml").read_text()))
    code = flat(Params().model_dump(mode="json"))
    assert sorted(set(code) - set(committed)) == [], "settings missing from params.yaml"
    assert sorted(set(committed) - set(code)) == [], "params.yaml keys the code does not know"
    differ = {k for k in code if committed[k] != code[k] and not (isinstance(code[k], list) and
                                                                 list(committed[k] or []) == code[k])}  # fmt: skip
    assert differ == set(DEMO_OVERRIDES), f"undeclared differences: {sorted(differ - set(DEMO_OVERRIDES))}"


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_every_params_flag_names_a_field_and_generated_flags_keep_its_name(command: str) -> None:
    seed = {"--data-dir", "--output-dir", "--batch-size", "--timesteps", "--max-tiles", "--grad-accum-steps", "--lr",
            "--lora-rank", "--epochs", "--val-every", "--save-every", "--early-stopping", "--early-stopping-patience",
            "--load-in-8bit", "--lora-cross-attention-only", "--stage1-dir"}  # fmt: skip
    for flag in FLAGS[command]:
        field_info(flag.field)  # KeyError: a flag without a field
        if flag.name not in seed:
            own = "--" + flag.field.rsplit(".", 1)[-1].replace("_", "-")
            assert flag.name == own, f"{flag.name} renames {flag.field}"
    names = [f.name for f in FLAGS[command]]
    assert len(names) == len(set(names))


def other_value(annotation, current) -> list[str]:
    """Command-line words for a valid value of a field that differs from ``current``."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(next(c for c in typing.get_args(annotation) if c != current))]
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return [typing.get_args(item)[0]] if typing.get_origin(item) is typing.Literal else ["a", "b"]
    return ["5" if current == 3 else "3"] if annotation is not str else [f"{current}-other"]


def field_value(cfg: Params, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_flags_not_passed_change_nothing_and_passed_ones_reach_their_field(command: str) -> None:
    cfg = Params()
    parser = build_parser()
    assert apply(cfg, passed(parser.parse_args([command]), command)) == cfg
    for flag in FLAGS[command]:
        info = field_info(flag.field)
        if flag.to_field is not None:  # --lora-cross-attention-only: tests/test_training.py
            continue
        if info.annotation is bool:
            args = [f"--no-{flag.name[2:]}" if field_value(cfg, flag.field) else flag.name]
        else:
            args = [flag.name, *other_value(info.annotation, field_value(cfg, flag.field))]
        changed = apply(cfg, passed(parser.parse_args([command, *args]), command))
        assert field_value(changed, flag.field) != field_value(cfg, flag.field), args
        untouched = {k: v for k, v in changed.model_dump().items() if k != flag.field.split(".")[0]}
        assert untouched == {k: v for k, v in cfg.model_dump().items() if k != flag.field.split(".")[0]}, args


def test_importing_terratorch_leaves_float32_matmuls_in_float32():
    """``import terratorch`` sets torch's float32 matmul precision to "medium" (bf16 on AMX CPUs); GAC restores it."""
    code = (
        "import torch; from gac.config import Stage2Params; from gac.models import prithvi; "
        "prithvi.new_band_indices(Stage2Params()); import terratorch; "
        "print(torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["highest", "ieee"]
