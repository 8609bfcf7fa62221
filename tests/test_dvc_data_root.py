"""The real data root is a dependency: the catalog stage depends on ``${data.root}``, wherever ``params.yaml`` puts it.

``configs/bigearthnet-gpu.yaml`` (copied over ``params.yaml``, then ``data.root`` set: docs/real-world.md) names an
absolute folder outside the repository; DVC hashes it like a folder inside, so a change to any file of the data
makes the catalog stage (and everything after it) out of date. What that hashing costs at 550k tiles:
``benchmarks/data_root_status.py``, whose project and root helpers this test uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from test_benchmarks import _load as load_benchmark

bench = load_benchmark("data_root_status")


def test_the_catalog_stage_depends_on_the_data_root_outside_the_repo(tmp_path: Path, synthetic_root: Path) -> None:
    root = tmp_path / "mnt" / "BigEarthNet-V2"
    shutil.copytree(synthetic_root, root)
    repo = bench.project(tmp_path / "project", root)
    assert root.resolve() not in repo.resolve().parents and repo.resolve() not in root.resolve().parents
    site = tmp_path / "dvc-site"

    def status() -> dict:
        return json.loads(bench.dvc(["status", "--json", "catalog"], repo, site)[1] or "{}")

    figures = bench.measure(repo, tmp_path / "dvc")  # dvc repro catalog, then two clean `dvc status`
    assert set(figures) == {"repro", "first", "again"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["catalog"]
    (dep,) = [d for d in lock["deps"] if not d["path"].startswith(("gac/", "pipelines/"))]
    assert dep["path"] == str(root) and dep["nfiles"] == sum(1 for p in root.rglob("*") if p.is_file())
    assert status() == {}

    band = next(root.joinpath("BigEarthNet-S2").rglob("*_B04.tif"))
    original = band.read_bytes()
    band.write_bytes(original[:-4] + bytes(b ^ 0xFF for b in original[-4:]))  # same size, other content
    assert status() == {"catalog": [{"changed deps": {str(root): "modified"}}]}
    band.write_bytes(original)  # the content back (a new mtime): DVC rehashes and finds the recorded hash
    assert status() == {}
