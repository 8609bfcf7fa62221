# GAC on a CUDA machine: a runtime image with the pins of requirements.txt only (torch's CUDA wheels; no dev/test
# tools from requirements-dev.txt), then the whole pipeline.
# For the real world, mount a BigEarthNet v2 root and point data.root at it in params.yaml.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
# Python 3.11 (the version requirements.txt was resolved for) from the deadsnakes PPA; git for DVC.
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common git make \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /gac
COPY requirements.txt pyproject.toml README.md ./
RUN python3.11 -m venv .venv && .venv/bin/pip install --no-cache-dir -r requirements.txt
COPY . .
# Mark the venv as set up under the Makefile's own stamp name, so `make repro` does not run `setup` (which would add
# the dev/test tools of requirements-dev.txt) when the container starts.
# hadolint ignore=SC2016
RUN .venv/bin/pip install --no-cache-dir --no-deps -e . \
    && touch "$(make -s --eval='print-stamp: ; @echo $(STAMP)' print-stamp)"
ENV PATH=/gac/.venv/bin:$PATH
CMD ["make", "PYTHON=python3.11", "repro"]
