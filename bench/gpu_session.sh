#!/usr/bin/env bash
# One prepared device call (about 8 minutes on an H200): the GPU tests, then the throughput rows of the
# performance issue. Wheels the GPU image lacks travel in .whl/ (see /bench/README.md, "On the device").
set -o pipefail
. bench/device_env.sh
python3 -c "import torch, transformers, accelerate, peft, datasets, trl, liger_kernel; print('torch', torch.__version__, torch.cuda.get_device_name(), '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__, '| trl', trl.__version__)"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
timeout 190 python3 bench/throughput.py --model llama3_2_1b --data alpaca --warmup 2 --steps 5 \
  --systems distsft_liger,distsft_liger_loop,trl_padfree_liger,trl_packing_liger --timeout 100 --out "$OUT" 2>&1 | tail -12 | tee "$OUT/bench_1b.log"
for every in 1 2; do
  timeout 110 python3 bench/throughput.py --model llama3_1_8b --data alpaca --lora --warmup 1 --steps 3 --rows 2 \
    --checkpoint-every $every --systems distsft_liger --timeout 100 --out "$OUT" 2>&1 | tail -6 | tee -a "$OUT/bench_8b.log"
done
