"""Long rows on one GPU: peak memory, step time and tokens/s of distsft's training step at a given row length,
with the memory savers for long rows added one at a time (distsft.plan's SAVERS), next to the plan's estimate.

    python bench/long_context.py --model llama3_1_8b --lora --lengths 32768,131072     # tokens/s at 32k and 128k
    python bench/long_context.py --model llama3_1_8b --lora --longest --savers 3       # the longest row that trains
    python bench/long_context.py --model tiny --device cpu --lengths 256,512 --steps 1  # the harness on CPU

Each row is one document of the full length (the worst case for attention: its cost is quadratic in the
document), 30% prompt, the rest supervised; one row per optimizer step. The model is built on the device from
``bench/models/<name>/config.json`` (random weights; a frozen LoRA base in bf16, full fine-tuning with fp32
masters under bf16 autocast), then transformed by distsft's own stages (adapters and checkpointing, tiled MLP,
checkpoint offload, the supervised-position head) and trained by distsft's ``train_step`` with fused AdamW.

Every (length, saver) runs in its own process: a clean allocator for ``max_memory_allocated``, and an
out-of-memory error ends only that run. ``--longest`` starts each saver at the length distsft.plan predicts for
this GPU (``--gpu-memory-gib``, default the device's) and steps down 10% at a time after an out-of-memory error,
one optimizer step per try. MFU counts causal attention (distsft.trainer.metrics.model_flops) over 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import PEAK, ROOT, Clock, compose, model_dir, run_child  # noqa: E402  (bench/ is not a package)

sys.path.insert(0, str(ROOT))
PROMPT = 0.3  # of each document, unsupervised


def saver(index: int) -> tuple[str, dict]:
    from distsft.memory import SAVERS

    return SAVERS[index]


def overrides(a, length: int, saver_index: int) -> list[str]:
    """The Hydra overrides of this run: what distsft.plan is asked about and what the run is built from."""
    over = [f"model.name_or_path={model_dir(a.model)}", "model.init=config",
            f"model.tokenizer={model_dir('tiny')}", f"data.max_seq_len={length}", "trainer.micro_batch_size=1",
            "trainer.grad_accum=1", "trainer.global_batch_size=null", "optim.weight_decay=0.0"]
    over += [f"model.{k}={str(v).lower()}" for k, v in saver(saver_index)[1].items()]
    if a.device == "cuda":
        over += ["model.dtype=bfloat16", "trainer.precision=bf16"]
    if a.lora:
        over += ["peft=lora", "peft.dropout=0.0"]
    return over


def build(a, cfg):
    """The model on the device, through distsft's stages (the order of distsft.model.build)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.model.attention import resolve_attention
    from distsft.model.head import install as install_head
    from distsft.model.offload import apply_checkpoint_offload
    from distsft.model.peft import apply_peft
    from distsft.model.tiling import apply_tiled_mlp

    cuda, m = a.device == "cuda", cfg.model
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda and a.lora else torch.float32  # trainable weights are fp32 masters
    with torch.device(a.device):  # random weights made where they train (an 8B init on CPU takes minutes)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(m.name_or_path), dtype=dtype,
                                                 attn_implementation=resolve_attention("varlen", cuda))
    model.config.use_cache = False
    model = apply_peft(model, cfg.peft, m.gradient_checkpointing, m.checkpoint_every, bf16_autocast=cuda)
    if m.tiled_mlp_shards:
        apply_tiled_mlp(model, m.tiled_mlp_shards)
    stats = apply_checkpoint_offload(model)[1] if m.offload_checkpoints else {"bytes": 0}
    install_head(model, cfg.trainer.loss_chunk)
    return model, stats


def one(a) -> dict:
    """One (length, saver) in this process: warm-up and timed steps, or an out-of-memory verdict."""
    from distsft.batch import resolve_batch
    from distsft.data.loader import StepLoader
    from distsft.data.packing import best_fit_decreasing
    from distsft.data.store import TokenStore
    from distsft.memory import memory_estimate
    from distsft.plan import model_shape
    from distsft.trainer.accelerator import build_accelerator
    from distsft.trainer.metrics import model_flops
    from distsft.trainer.optim import build_optimizer
    from distsft.trainer.step import train_step

    cuda, length, n_steps = a.device == "cuda", a.length, a.warmup + a.steps
    cfg = compose(overrides(a, length, a.saver))
    out = {"length": length, "saver": saver(a.saver)[0], "model": a.model, "lora": a.lora,
           "estimate_gib": memory_estimate(cfg, model_shape(cfg), 1, 1)["total"] / 2**30}
    plan = resolve_batch(1, 1, None, 1)
    acc = build_accelerator(cfg.parallel, cfg.trainer, plan)
    vocab = vocab_size(cfg)
    rng = np.random.default_rng(1)
    ids = [rng.integers(min(1000, vocab // 4), vocab, length).tolist() for _ in range(n_steps)]
    labels = [[-100] * int(PROMPT * length) + x[int(PROMPT * length):] for x in ids]
    store = TokenStore(ids, labels)
    loader = StepLoader(store, best_fit_decreasing(store.lengths, length, 0), plan, 0, cfg.data, pad_id=0,
                        pin_memory=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        model, offload = build(a, cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        per_token, per_sq = model_flops(model, trainable, sum(p.numel() for p in model.parameters()))
        model, optimizer = acc.prepare(model, build_optimizer(model, cfg.optim))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        model.train()
        clock, losses = Clock(cuda), []
        for step, mbs in enumerate(loader.steps(0)):
            if step == a.warmup:
                clock.start()
            offload["bytes"] = 0
            res = train_step(model, mbs, acc, optimizer, scheduler, 1.0)
            losses.append(res.loss_sum)
            if step >= a.warmup:
                clock.tick()
            if step + 1 == n_steps:
                break
        times = clock.times
    except torch.OutOfMemoryError as e:
        return {**out, "oom": True, "error": str(e).splitlines()[0][:200]}
    seconds = sum(times) / len(times) if times else math.nan
    flops = per_token * length + per_sq * length ** 2
    return {**out, "oom": False, "step_s": seconds, "tokens_per_s": length / seconds,
            "mfu": flops / seconds / PEAK if cuda else None, "first_loss": float(losses[0]),
            "ln_vocab": math.log(vocab), "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "offloaded_gib_per_step": offload["bytes"] / 2**30}


def vocab_size(cfg) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.model.name_or_path).vocab_size


def child(a, length: int, saver_index: int, warmup: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--length", str(length), "--saver", str(saver_index),
           "--model", a.model, "--device", a.device, "--warmup", str(warmup), "--steps", str(steps)] + \
        (["--lora"] if a.lora else [])
    return run_child(cmd, a.timeout, {"length": length, "saver": saver(saver_index)[0]})


def predicted_longest(a, saver_index: int) -> int:
    from distsft.memory import longest_sequences
    from distsft.plan import model_shape, plan_peak

    cfg = compose(overrides(a, 4096, saver_index))
    gib = a.gpu_memory_gib or torch.cuda.get_device_properties(0).total_memory / 2**30
    rows = longest_sequences(cfg, model_shape(cfg), 1, False, gib * 2**30, plan_peak(cfg))
    return rows[saver_index]["max_seq_len"]


def line(r: dict) -> str:
    if "error" in r and not r.get("oom"):
        return f"{r['length']:>9,} {r['saver']:<28} failed: {r['error'].splitlines()[-1][:100] if r['error'] else '?'}"
    if r["oom"]:
        return f"{r['length']:>9,} {r['saver']:<28} out of memory (estimate {r['estimate_gib']:.1f} GiB)"
    mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    return (f"{r['length']:>9,} {r['saver']:<28} {r['tokens_per_s']:>9,.0f} {mfu:>6} {r['step_s']:>8.2f} "
            f"{mem:>8} {r['estimate_gib']:>8.1f} {r['offloaded_gib_per_step']:>8.3g} {r['first_loss']:>6.3f}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3_1_8b", help="a folder of bench/models, or tiny")
    p.add_argument("--lora", action="store_true", help="LoRA r=16 on all linear layers (a frozen bf16 base)")
    p.add_argument("--lengths", default="32768,131072", help="row lengths to time (tokens)")
    p.add_argument("--savers", default="1,2,3",
                   help="distsft.plan.SAVERS by index: 0 as configured, 1 + checkpointing, "
                        "2 + tiled MLP, 3 + checkpoint offload")
    p.add_argument("--longest", action="store_true", help="find the longest row that trains, from the plan's answer")
    p.add_argument("--tries", type=int, default=4, help="--longest: tries per saver (10%% shorter each)")
    p.add_argument("--gpu-memory-gib", type=float, default=0.0, help="--longest: the plan's budget (0: the GPU's)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--saver", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    a = parse(argv)
    if a.child:
        print("RESULT " + json.dumps(one(a)), flush=True)
        return []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"long_context_{a.model}{'_lora' if a.lora else ''}{'_longest' if a.longest else ''}.json"
    print(f"{'length':>9} {'saver':<28} {'tok/s':>9} {'MFU':>6} {'step s':>8} {'mem GiB':>8} {'est GiB':>8} "
          f"{'host GiB':>8} {'loss0':>6}", flush=True)
    results = []
    for s in (int(x) for x in a.savers.split(",")):
        if a.longest:
            length = predicted_longest(a, s)
            for _ in range(a.tries):
                r = child(a, length, s, 0, 1)
                results.append({**r, "predicted": length if not results or results[-1]["saver"] != r["saver"]
                                else results[-1]["predicted"]})
                print(line(r), flush=True)
                if not r.get("oom"):
                    break
                length = int(length * 0.9) // 256 * 256
        else:
            for length in (int(x) for x in a.lengths.split(",")):
                results.append(child(a, length, s, a.warmup, a.steps))
                print(line(results[-1]), flush=True)
        path.write_text(json.dumps(results, indent=1))  # kept if a later run hangs
    print(f"{a.model} {'LoRA r=16' if a.lora else 'full fine-tune'}, one document per row, "
          f"{torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}; results in {path}")
    return results


if __name__ == "__main__":
    main()
