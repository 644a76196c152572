#!/usr/bin/env bash
# Quick start: set up .venv and train the embedded default (tiny Llama + bundled data) on this machine.
# Extra arguments are Hydra overrides, e.g. `bash launch/quickstart.sh trainer.max_steps=20`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m distsft.train "$@"
