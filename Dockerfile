# GAC on a CUDA machine: the same pins as requirements.txt (torch's CUDA wheels), then the whole pipeline.
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
RUN .venv/bin/pip install --no-cache-dir --no-deps -e .
ENV PATH=/gac/.venv/bin:$PATH
CMD ["make", "PYTHON=python3.11", "repro"]
