# GAC on a CUDA machine: `make repro` (or `dvc repro` on a real params.yaml) with no network at run time.
# Build: docker build -t gac .   Run: docker run --rm --gpus all gac   (docs/real-world.md, "Container": volumes, data)
#
# No CUDA base image: the pinned torch 2.14.1+cu130 wheel brings its own CUDA 13.0 runtime, cuDNN, NCCL, … as the
# nvidia-* wheels pinned in requirements.txt; the host needs only an NVIDIA driver for CUDA 13 and the NVIDIA Container
# Toolkit (`--gpus`). The base matches what requirements.txt was compiled for (its first lines: `uv pip compile …
# --python-version 3.11 --python-platform x86_64-manylinux_2_34`): CPython 3.11 on glibc >= 2.34 (bookworm: 2.36).
FROM python:3.11-slim-bookworm

# make runs the pipeline; git is DVC's and records each run's commit; libexpat1 is the one system library a pinned
# wheel needs that it does not bundle (rasterio's GDAL). Debian's security updates replace exact versions, so they
# are not pinned: the base image's tag fixes the distribution.
# g++: inductor compiles its CPU kernels with it (stage1.compile: true).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git make libexpat1 g++ \
    && rm -rf /var/lib/apt/lists/*

# No pip cache in the image; no usage reports sent from the container (DVC analytics, MLflow telemetry).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

WORKDIR /gac

# The pinned packages in a layer of their own (≈ 7 GB), the way `make setup` installs them: the runtime pins, then the
# dev/test tools of requirements-dev.txt, so the venv is the one the Makefile's install stamp stands for.
COPY requirements.txt requirements-dev.txt ./
RUN python3 -m venv .venv \
    && .venv/bin/python -m pip install -q -r requirements.txt \
    && .venv/bin/python -m pip install -q -r requirements-dev.txt

COPY . .

# `make setup` itself installs GAC (editable) and writes the install stamp under the name the Makefile computes, so
# `make repro` in the container finds the venv set up and installs nothing; `make -q setup` fails the build otherwise.
RUN make setup && make -q setup

# The one download `make repro` would make: `gac sample` fetches the configilm wheel holding the sample tiles into
# its --cache-dir (default .cache, under WORKDIR). Fetched here, with the same command as the Makefile's `data`
# recipe, so the run-time `gac sample --root data` reads it from /gac/.cache.
RUN .venv/bin/gac sample --root /tmp/gac-sample && rm -rf /tmp/gac-sample

ENV PATH=/gac/.venv/bin:$PATH

# MLflow's store and registry, and the DVC cache: keep them across containers with -v (docs/real-world.md).
VOLUME ["/gac/mlruns", "/gac/.dvc/cache"]

CMD ["make", "repro"]
