# Cluster image: CUDA runtime + the project installed the way the README installs it, from the lock.
# Build:  docker build -t mpt-forge .
# Run:    docker run --gpus all --ipc=host -v /data:/data mpt-forge scripts/train.py yamls/mpt-1b.yaml
FROM nvidia/cuda:12.6.3-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential git && \
    rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/mpt-forge
COPY . .
# Every package at the version CI tested: requirements/lock.txt as constraints (README, "Installing").
RUN python3.11 -m venv /opt/venv && \
    /opt/venv/bin/pip install -c requirements/lock.txt -e . && \
    (/opt/venv/bin/pip install -c requirements/lock.txt --no-build-isolation 'flash-attn>=2.4.2,<3' || \
     echo 'flash-attn not built: attn_impl flash unavailable')
ENV PATH=/opt/venv/bin:$PATH

# `docker run IMAGE scripts/train.py yamls/....yaml key=value ...` launches one process per local GPU.
ENTRYPOINT ["composer"]
CMD ["scripts/train.py", "yamls/tiny-cpu.yaml"]
