"""How far the committed figures reproduce on another CPU: ``dvc repro --force`` with oneDNN and MKL held to another
instruction set, compared with what is committed.

A clone of this repository's HEAD gets the embedded sample (``gac sample``, the bytes ``data.dvc`` names), then runs
the whole pipeline again under ``ONEDNN_MAX_CPU_ISA`` and ``MKL_ENABLE_INSTRUCTIONS`` (default ``AVX2``: the kernels
of a CPU without AVX-512 or AMX). It prints which outputs are byte-identical to the committed ``dvc.lock`` and, for
every float in ``metrics/evaluate.json``, the committed value, the rerun's and their relative difference.

    python benchmarks/cross_isa.py               # ≈ 3 min on 2 cores
    python benchmarks/cross_isa.py --isa AVX512_CORE

The last line is ``cross-isa: <ISA> vs committed: <k> of <n> outputs byte-identical, headline figures within <r>
relative``. The committed figures are those of the machine that last ran ``make repro`` (docs/reproducibility.md
names it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def outs(lock: dict) -> dict[str, str]:
    """``{output path: md5}`` of every stage's outputs in a parsed ``dvc.lock`` (timing-only metrics files left out)."""
    found = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if not out["path"].startswith(("metrics/", "plots/")):
                found[out["path"]] = out["md5"]
    return found


def floats(data: object, prefix: str = "") -> dict[str, float]:
    """Every float of a nested JSON object, keyed by its dotted path."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in floats(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data} if isinstance(data, float) else {}


def committed_text(where: Path, path: str) -> str:
    """``path`` as committed (the clone's HEAD), before the rerun wrote over it."""
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=where, capture_output=True, text=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", default="AVX2", help="ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS (default AVX2)")
    parser.add_argument("--dir", type=Path, help="clone here (default: a temporary folder, removed afterwards)")
    args = parser.parse_args(argv)

    holder = None if args.dir else tempfile.TemporaryDirectory(prefix="gac-cross-isa-")
    where = args.dir or Path(holder.name) / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(where),
                        "ONEDNN_MAX_CPU_ISA": args.isa, "MKL_ENABLE_INSTRUCTIONS": args.isa}  # fmt: skip
    log = where.parent / "cross-isa.log"
    with log.open("w") as out:
        for cmd in (["gac", "sample", "--root", "data"], ["dvc", "add", "-q", "data"], ["dvc", "repro", "--force"]):
            if subprocess.run(cmd, cwd=where, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode:
                sys.exit(f"cross-isa: {' '.join(cmd)} failed; its log {log}:\n{log.read_text()[-4000:]}")

    committed = outs(yaml.safe_load(committed_text(where, "dvc.lock")))
    rerun = outs(yaml.safe_load((where / "dvc.lock").read_text()))
    same = [p for p in committed if rerun.get(p) == committed[p]]
    print(f"outputs rerun with ONEDNN_MAX_CPU_ISA={args.isa} MKL_ENABLE_INSTRUCTIONS={args.isa}:")
    for path in committed:
        print(f"  {path:<34} {'byte-identical' if path in same else 'differs'}")
    old = floats(json.loads(committed_text(where, "metrics/evaluate.json")))
    new = floats(json.loads((where / "metrics" / "evaluate.json").read_text()))
    print(f"{'metrics/evaluate.json':<34} {'committed':>14} {'rerun':>14} {'rel diff':>9}")
    worst = 0.0
    for key, value in old.items():
        rel = abs(new[key] - value) / max(abs(value), 1e-12)
        worst = max(worst, rel)
        print(f"  {key:<32} {value:>14.9g} {new[key]:>14.9g} {rel:>9.1e}")
    if holder:
        holder.cleanup()
    print(f"cross-isa: {args.isa} vs committed: {len(same)} of {len(committed)} outputs byte-identical, "
          f"headline figures within {worst:.1e} relative")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
