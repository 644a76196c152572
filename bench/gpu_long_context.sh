#!/usr/bin/env bash
# One prepared device call for long rows (#13; about 9 minutes on an H200, predictions from distsft.plan):
# the checkpoint-offload GPU test, then Llama-3.1-8B LoRA tokens/s at 32k (each saver) and 128k (all savers on).
# The longest row that trains (--longest) takes one optimizer step per try at 300k-1M tokens (minutes each):
# run it on its own when the device budget allows. Wheels travel in .whl/ as for gpu_session.sh.
set -o pipefail
. bench/device_env.sh
timeout 90 python3 -m pytest -q -s -p no:cacheprovider tests/gpu -k "offload" 2>&1 | tail -8 | tee "$OUT/gpu_offload.log"
timeout 200 python3 bench/long_context.py --model llama3_1_8b --lora --lengths 32768 --savers 1,2,3 --warmup 1 \
  --steps 2 --timeout 90 --out "$OUT" 2>&1 | tee "$OUT/long_32k.log"
timeout 240 python3 bench/long_context.py --model llama3_1_8b --lora --lengths 131072 --savers 3 --warmup 0 \
  --steps 1 --timeout 230 --out "$OUT/128k" 2>&1 | tee "$OUT/long_128k.log"
