#!/usr/bin/env bash
# A prepared device call for the 8B LoRA levers of the performance issue (#17; about 8 minutes on an H200): the FP8
# GPU test, then Llama-3.1-8B LoRA r16 with distsft_liger as is, with the frozen base in FP8 (model.fp8), with
# compiled layers (model.compile), and with both. Predictions (bench/README.md): FP8 alone +15-25% (the
# base matmuls are ~70% of the step, at twice the rate; torchao's casts are separate memory-bound passes, ~5% of
# the step), FP8 + compile +20-30% (the casts fused), compile alone +5-10%. The GPU image has no torchao: carry
# a torchao wheel in .whl/ with the others (its float8 code is Python; pick the release made for the image's torch).
set -o pipefail
. bench/device_env.sh
timeout 90 python3 -m pytest -q -s -p no:cacheprovider tests/gpu -k "fp8" 2>&1 | tail -6 | tee "$OUT/gpu_fp8.log"
for flags in "" "--fp8" "--compile" "--fp8 --compile"; do
  timeout 110 python3 bench/throughput.py --model llama3_1_8b --data alpaca --lora --warmup 2 --steps 3 --rows 2 \
    --systems distsft_liger $flags --timeout 100 --out "$OUT" 2>&1 | tail -3 | tee -a "$OUT/bench_8b_fp8.log"
done
