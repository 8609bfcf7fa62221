"""House rules that CI enforces: the code is ruff-clean, the Dockerfile lints clean and keeps its promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "gac", "pipelines", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]


# The container (Dockerfile): what it promises — it lints clean, its base fits the pinned wheels, `make repro` in it
# installs nothing and downloads nothing — checked on the file itself; no image is built here.

GLIBC = {"bookworm": (2, 36), "trixie": (2, 41), "bullseye": (2, 31), "ubuntu20.04": (2, 31), "ubuntu22.04": (2, 35),
         "ubuntu24.04": (2, 39)}  # fmt: skip


def _dockerfile(text: str | None = None) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, argument), continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text() if text is None else text
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        cur = f"{cur} {s.removesuffix(chr(92)).strip()}".strip()
        if not s.endswith(chr(92)):
            op, _, arg = cur.partition(" ")
            out.append((op.upper(), arg.strip()))
            cur = ""
    return out


def _compiled_for() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(Python, glibc, CUDA) versions the pins of requirements.txt are for: its uv header and its CUDA runtime wheel."""
    text = (ROOT / "requirements.txt").read_text()
    python = re.search(r"--python-version (\d+)\.(\d+)", text)
    glibc = re.search(r"--python-platform x86_64-manylinux_(\d+)_(\d+)", text)
    cuda = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)", text, re.M)
    assert python and glibc and cuda, "requirements.txt lost its uv header or its CUDA runtime pin"
    return tuple(map(int, python.groups())), tuple(map(int, glibc.groups())), tuple(map(int, cuda.groups()))


def _base_problems(image: str) -> list[str]:
    """Why the base image ``image`` cannot run the pinned wheels (empty when it can)."""
    python, glibc, cuda = _compiled_for()
    name, _, tag = image.partition(":")
    if not tag or tag == "latest":
        return [f"{image}: not pinned by a tag"]
    problems = []
    if name in ("python", "docker.io/library/python"):
        m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?-(?:slim-)?([a-z]+)", tag)
        if not m:
            return [f"{image}: tag not understood (want <major>.<minor>[.<patch>]-[slim-]<debian>)"]
        if (int(m[1]), int(m[2])) != python:
            problems.append(f"{image}: Python {m[1]}.{m[2]}, requirements.txt is compiled for {python}")
        distro = m[3]
    elif name == "nvidia/cuda":
        m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?-.*-(ubuntu\d+\.\d+)", tag)
        if not m:
            return [f"{image}: tag not understood"]
        if (int(m[1]), int(m[2])) < cuda:
            problems.append(f"{image}: CUDA {m[1]}.{m[2]} is older than the wheels' CUDA {cuda}")
        distro = m[3]
    else:
        return [f"{image}: unknown base; teach tests/test_style.py its Python, glibc and CUDA"]
    if distro not in GLIBC:
        problems.append(f"{image}: glibc of {distro} unknown; add it to GLIBC")
    elif GLIBC[distro] < glibc:
        problems.append(f"{image}: glibc {GLIBC[distro]} < manylinux {glibc} of the wheels")
    return problems


def test_dockerfile_hadolint_clean():
    hadolint = Path(sys.executable).with_name("hadolint")
    out = subprocess.run([str(hadolint), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_dockerfile_base_fits_the_pinned_wheels():
    bases = [arg.split()[0] for op, arg in _dockerfile() if op == "FROM"]
    assert len(bases) == 1, bases
    assert _base_problems(bases[0]) == []
    # the check itself refuses what it is there for: the old CUDA 12.8 base under CUDA 13 wheels, another Python
    assert _base_problems("nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04")
    assert _base_problems("python:3.12-slim-bookworm") and _base_problems("python:3.11-slim-bullseye")


def _gac_sample_cache_dir(command: str) -> str | None:
    m = re.search(r"gac sample\b([^;&|]*)", command)
    assert m, command
    opt = re.search(r"--cache-dir[ =](\S+)", m[1])
    return opt[1] if opt else None


def test_dockerfile_repro_installs_and_downloads_nothing(tmp_path):
    steps = _dockerfile()
    last_copy = max(i for i, (op, arg) in enumerate(steps) if op == "COPY" and arg.split()[:1] == ["."])
    runs = {i: arg for i, (op, arg) in enumerate(steps) if op == "RUN"}
    # The install stamp is the Makefile's own: `make setup` writes it after the last COPY, nothing forges one.
    setup = [i for i, arg in runs.items() if re.search(r"\bmake setup\b", arg) and re.search(r"\bmake -q setup\b", arg)]
    assert setup and setup[-1] > last_copy, "the image must run `make setup && make -q setup` after `COPY . .`"
    assert not any(".installed-" in arg or "STAMP" in arg for arg in runs.values())
    # ... and with that stamp in place `make repro` goes straight to the data: no venv, no pip.
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt", "pyproject.toml"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    make = ["make", "-s", "-C", str(tmp_path)]
    stamp = subprocess.run([*make, "--eval=print-stamp: ; @echo $(STAMP)", "print-stamp"], capture_output=True,
                           text=True, check=True).stdout.strip()  # fmt: skip
    assert stamp.startswith(".venv/.installed-"), stamp
    (tmp_path / stamp).parent.mkdir()
    (tmp_path / stamp).touch()
    plan = subprocess.run([*make, "-n", "repro"], capture_output=True, text=True, check=True).stdout
    assert "gac sample" in plan and not re.search(r"\bpip\b|-m venv", plan), plan
    # The one download of `make repro` (the sample's wheel) is made at build time, into the cache the run-time
    # `gac sample` of the Makefile's `data` recipe reads: the same --cache-dir (or none: .cache under WORKDIR).
    recipe = re.search(r"^data:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "Makefile has no data recipe"
    fetch = [i for i, arg in runs.items() if "gac sample" in arg]
    assert fetch and fetch[0] > last_copy and "cd " not in runs[fetch[0]]
    assert _gac_sample_cache_dir(runs[fetch[0]]) == _gac_sample_cache_dir(recipe[1])
    # The build context leaves out what the image makes itself or must not carry.
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".cache", "data", "artifacts", ".dvc/cache", ".dvc/tmp", ".dvc/config.local"} <= ignored
