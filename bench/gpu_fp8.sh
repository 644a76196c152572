#!/usr/bin/env bash
# Prepared device calls for the FP8 lever of the performance issue (#17), one per call (each about 7-8 minutes
# on an H200):
#   bash bench/gpu_fp8.sh 8b   the FP8 GPU test, then Llama-3.1-8B LoRA r16 with distsft_liger as is, with the frozen
#                              base in FP8 (model.fp8), with compiled layers (model.compile), and with both
#   bash bench/gpu_fp8.sh 1b   Llama-3.2-1B full fine-tune (fp32 masters) with distsft_liger the same four ways
# Predictions (bench/README.md): 8B LoRA: FP8 alone +15-25% (the base matmuls are ~70% of the step, at twice the
# rate; torchao's casts are separate memory-bound passes, ~5% of the step), FP8 + compile +20-30% (the casts
# fused), compile alone +5-10%. 1B full: FP8 +5-15% (the 128k-vocabulary head and the fused loss stay in bf16,
# and the 2048-wide matmuls are short), with compile +10-20%.
# The GPU image has no torchao: carry a torchao wheel in .whl/ with the others (its float8 code is Python; pick
# the release made for the image's torch).
set -o pipefail
. bench/device_env.sh
if [ "${1:-8b}" = 8b ]; then
  timeout 90 python3 -m pytest -q -s -p no:cacheprovider tests/gpu -k "fp8" 2>&1 | tail -6 | tee "$OUT/gpu_fp8.log"
  model="--model llama3_1_8b --lora --rows 2 --warmup 2 --steps 3"
else
  model="--model llama3_2_1b --warmup 3 --steps 5"
fi
for flags in "" "--fp8" "--compile" "--fp8 --compile"; do
  timeout 115 python3 bench/throughput.py $model --data alpaca --systems distsft_liger $flags --timeout 105 \
    --out "$OUT" 2>&1 | tail -3 | tee -a "$OUT/bench_fp8_${1:-8b}.log"
done
