# GAC on a CUDA machine: the same pins as requirements.txt, then the whole pipeline (`dvc repro`).
# Mount a BigEarthNet v2 root and point data.root at it (params.yaml) for the real world.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv git make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /gac
COPY requirements.txt pyproject.toml README.md ./
RUN python3.11 -m venv .venv && .venv/bin/pip install --no-cache-dir -r requirements.txt
COPY . .
RUN .venv/bin/pip install --no-cache-dir --no-deps -e .
ENV PATH=/gac/.venv/bin:$PATH
CMD ["make", "repro"]
