#!/usr/bin/env bash
# Creates .venv (if needed) and installs distsft with its pinned dependencies.
# On a machine without CUDA, torch is pinned to the CPU build first so nothing pulls a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.distsft-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  extras=dev
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "torch==2.13.0"
  else
    extras=dev,liger  # Liger's Triton kernels: model.kernels=auto uses them on CUDA
  fi
  pip install -q -e ".[$extras]"
  touch "$stamp"
fi
