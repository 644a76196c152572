#!/usr/bin/env bash
# Prepared device call for the fused LoRA add lever of the performance issue (#17; about 8 minutes on an H200):
# the GPU test, then Llama-3.1-8B LoRA r16 (2 rows x 4 accumulation, recomputing every 2nd layer: the best row so
# far) with PEFT's adapter forward (--no-fused-add) and with distsft's fused add (peft.fused_add, the default),
# eager and with compiled layers.
# Prediction (bench/README.md): PEFT writes B(A(x)), scales it and adds it to the base output (6 passes over each
# layer's [tokens, out] output, 2 more in backward); the fused add reads and writes the output once inside the
# adapter matmul. ~8 saved passes x 8192 tokens x 43,008 outputs x 2 bytes x 32 layers ~ 180 GB per micro-batch,
# ~45 ms of ~630 ms: +5-8% eager; +2-4% on top of compile (which already fuses the scale and the add into one pass).
set -o pipefail
. bench/device_env.sh
timeout 60 python3 -m pytest -q -s -p no:cacheprovider tests/gpu -k "fused_lora_add" 2>&1 | tail -4 | tee "$OUT/gpu_lora_add.log"
for flags in "--no-fused-add" "" "--compile --no-fused-add" "--compile"; do
  timeout 110 python3 bench/throughput.py --model llama3_1_8b --lora --rows 2 --checkpoint-every 2 --warmup 2 \
    --steps 3 --data alpaca --systems distsft_liger $flags --timeout 100 --out "$OUT" 2>&1 | tail -3 \
    | tee -a "$OUT/bench_lora_add.log"
done
