# The README's two commands: `make repro` (main job) and `make test` (tests). Both set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup data repro sweep rehearse test lint postgres mlflow-server

setup: $(STAMP)

# Runtime pins first, then the dev/test tools (requirements-dev.txt repeats the runtime pins, compiled against them).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

data: $(STAMP)
	$(BIN)/gac sample --root data
	$(BIN)/dvc add -q data  # the bytes are reproducible: data.dvc stays as committed, the cache gets filled

repro: data
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# The Optuna sweep, off the default path (it makes the catalog and opt_v1 first if needed); commit its
# sweeps/dvc.lock and metrics/sweep.json with the code it ran.
sweep: data
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro sweeps/dvc.yaml

# The real sizes of configs/bigearthnet-gpu.yaml end to end on this machine's CPU, in a throw-away project
# (benchmarks/rehearse.py: what it changes for a CPU, per-stage parameters, peak RSS, s/tile, FLOPs/tile).
rehearse: $(STAMP)
	$(BIN)/python benchmarks/rehearse.py

# PostgreSQL binaries for the distributed-sweep test (the test starts its own server on 127.0.0.1).
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql)

# A team's servers, for real, on this machine: PostgreSQL (MLflow's backend store and Optuna's storage), an S3 endpoint
# (moto) and `mlflow server` with proxied S3 artifacts, fresh in a new folder under .cache/, until Ctrl-C. It prints
# what each host exports (docs/team.md). A team runs the same three against its own database and object store.
mlflow-server: $(STAMP) postgres
	$(BIN)/python -m tools.servers --dir $(CURDIR)/.cache/team-$$(date +%Y%m%d-%H%M%S)

# pytest exits 5 when it collects no test: make fails on any non-zero status, so that cannot pass silently.
# Then the tests marked `numerics` (float comparisons of kernel output) again with oneDNN and MKL held to AVX2
# kernels: a second CPU's arithmetic next to this one's (docs/real-world.md, "CPUs").
test: $(STAMP) postgres
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q -d $(CURDIR)/.cache/site
	GAC_WHEEL_CACHE=$(CURDIR)/.cache $(BIN)/python -m pytest
	ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 GAC_WHEEL_CACHE=$(CURDIR)/.cache \
		$(BIN)/python -m pytest -m numerics --durations=5

lint: $(STAMP)
	$(BIN)/ruff check gac pipelines tests benchmarks
	$(BIN)/hadolint Dockerfile
