"""How long a checkpoint stops the training loop: synchronous vs ``trainer.async_save``.

One CPU process, a Llama-shaped model of about 134M parameters (fp32) with AdamW state after one step: a checkpoint
of about 1.6 GB (weights, two moments, scheduler, RNG). For each mode it calls distsft's own
``trainer.checkpoint.save`` as the loop does, and times

    blocked      how long the call holds the loop (sync: the whole write, fsync, checksums and rename; async: the
                 copy of the state into host memory, trainer.async_stage)
    complete     until the checkpoint has its COMPLETE marker (async: the background write included)

    python bench/checkpoint.py [--out DIR] [--repeats 3] [--layers 12]

DIR (default: a fresh temporary directory beside the repository, on the same disk as a run's output_dir would be)
receives the checkpoints; results go to ``$OUT/checkpoint.json`` when ``OUT`` is set, else to
``bench/results/checkpoint.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(layers: int):
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from distsft.trainer.checkpoint import TrainState

    acc = Accelerator(cpu=True)
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = TrainState()
    acc.register_for_checkpointing(sched, state)
    ids = torch.randint(0, 32000, (1, 64))
    model(input_ids=ids, labels=ids).loss.backward()  # the moments exist: a checkpoint of a model in training
    opt.step()
    return acc, model, opt


def timed_saves(acc, model, opt, root: Path, repeats: int, background) -> list[dict]:
    from distsft.trainer import checkpoint

    out = []
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        final = checkpoint.save(acc, root, i, {"bench": True}, keep=1, background=background)
        blocked = time.perf_counter() - t0
        if background is not None:
            background.wait(acc)
        out.append({"blocked_s": blocked, "complete_s": time.perf_counter() - t0,
                    "bytes": sum(p.stat().st_size for p in final.rglob("*") if p.is_file())})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--stage", default="/dev/shm")
    args = parser.parse_args()
    from distsft.trainer.async_save import Background

    work = args.out or Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=Path(__file__).resolve().parents[1]))
    acc, model, opt = build(args.layers)
    n = sum(p.numel() for p in model.parameters())
    results = {"parameters": n, "disk": str(work), "stage": args.stage}
    try:
        results["sync"] = timed_saves(acc, model, opt, work / "sync", args.repeats, None)
        bg = Background(acc, work / "async", args.stage, model, opt)
        results["async"] = timed_saves(acc, model, opt, work / "async", args.repeats, bg)
        bg.close()
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{n / 1e6:.0f}M parameters, checkpoint {results['sync'][0]['bytes'] / 1e9:.2f} GB, median of "
          f"{args.repeats}:\n")
    print("| mode | loop blocked (s) | until COMPLETE (s) |\n|---|---:|---:|")
    for mode in ("sync", "async"):
        rows = results[mode]
        print(f"| {mode} | {statistics.median(r['blocked_s'] for r in rows):.2f} | "
              f"{statistics.median(r['complete_s'] for r in rows):.2f} |")
    dest = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "checkpoint.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
