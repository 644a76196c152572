#!/usr/bin/env bash
# Test command: set up .venv and run the whole suite (GPU tests skip without CUDA).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k packing`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest "$@"
