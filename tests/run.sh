#!/usr/bin/env bash
# Test command: set up .venv and run the whole suite (GPU tests skip without CUDA).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k packing`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash slurm/local_cluster.sh || true  # a local 2-node SLURM cluster when root (else the SLURM tests skip)
.venv/bin/ruff check distsft tests bench  # lint first: pyflakes, import order, 120 columns (pyproject.toml)
exec .venv/bin/python -m pytest "$@"
