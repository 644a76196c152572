#!/usr/bin/env bash
# A second prepared device call for the performance issue (#17; about 9 minutes on an H200): the sharded path at
# world size 1 against ddp (1B full fine-tune: distsft under ddp, zero3 and fsdp), then the 8B LoRA rows with the
# strongest peer (TRL padding-free + Liger) given distsft's PEFT setting and PEFT's own, and distsft's whole loop.
set -o pipefail
. bench/device_env.sh
for strategy in ddp zero3 fsdp; do
  timeout 100 python3 bench/throughput.py --model llama3_2_1b --data alpaca --warmup 2 --steps 5 --systems distsft \
    --strategy $strategy --timeout 90 --out "$OUT" 2>&1 | tail -3 | tee -a "$OUT/bench_1b_strategies.log"
done
timeout 220 python3 bench/throughput.py --model llama3_1_8b --data alpaca --lora --warmup 1 --steps 3 --rows 2 \
  --systems distsft_liger,distsft_liger_loop,trl_padfree_liger --timeout 70 --out "$OUT" 2>&1 | tail -6 | tee "$OUT/bench_8b_peers.log"
timeout 90 python3 bench/throughput.py --model llama3_1_8b --data alpaca --lora --warmup 1 --steps 3 --rows 2 \
  --systems trl_padfree_liger --peers-peft-default --timeout 80 --out "$OUT" 2>&1 | tail -4 | tee -a "$OUT/bench_8b_peers.log"
