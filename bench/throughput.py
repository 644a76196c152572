"""Training throughput, MFU and memory of distsft side by side with TRL's SFTTrainer and HF Trainer.

    python bench/throughput.py --model llama3_2_1b --data alpaca            # one GPU, ~3 min
    python bench/throughput.py --model llama3_1_8b --data alpaca --lora     # LoRA r=16, checkpointing
    python bench/throughput.py --model tiny --data toy --steps 2            # the harness on CPU (seconds)

Every system gets the same model (built from ``bench/models/<name>/config.json``, random bf16 weights
made on the GPU from one seed), the same synthetic conversations (random token ids, never zeros;
lognormal lengths; the first ~30% of each one is prompt, unsupervised), the same optimizer (fused
AdamW, constant LR, clipping at 1.0) and bf16 autocast (with LoRA, the same PEFT setting: no fp32 copy of
adapter inputs; ``--peers-peft-default`` gives the peers PEFT's own), and about the same number of examples per
optimizer step (distsft packs to a token budget; the others take the mean of distsft's examples per
step). Each system runs in its own process (a clean allocator, a fair ``max_memory_allocated``):

    distsft       BFD-packed rows, torch varlen flash attention, distsft's own step (train_step)
    distsft_loop  the same inside the trainer's whole loop (loop.train: late reads, metrics window, TensorBoard)
    distsft_liger the same with model.kernels=liger (Liger RMSNorm/RoPE/SwiGLU + fused linear CE)
    distsft_liger_loop  distsft_liger inside the whole loop
    trl_pad       TRL SFTTrainer, padded batches, SDPA with a padding mask
    trl_padfree   TRL SFTTrainer, padding_free=True, the same varlen kernel as distsft
    trl_padfree_liger  the same with use_liger_kernel=True (TRL's own Liger integration)
    hf            transformers Trainer, dynamic padding (DataCollatorForSeq2Seq), SDPA

Steps are timed end to end (data included) after warm-up, by CUDA events at each optimizer-step end
(no synchronisation inside the timed steps; the peers log their loss at the first and last step
only, so neither side pays a per-step read-back it would not pay in real use). MFU counts 6N
per real token for full fine-tuning (4N with a frozen base) plus causal attention per document
(distsft.trainer.metrics.model_flops), over the H100 SXM dense bf16 peak (989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IGNORE = -100
PEAK = 989e12  # H100 SXM dense bf16
DATA = {  # lognormal token lengths: median, sigma, clip
    "alpaca": (150, 0.64, 4096),  # p95 = 150 * e^(1.645 * 0.64) ~ 430
    "ultrachat": (1200, 0.555, 8192),  # mean = 1200 * e^(0.555^2 / 2) ~ 1400
    "toy": (40, 0.5, 256),  # CPU smoke test with the tiny model
}
# distsft: (packed row length, rows per micro-batch, accumulation); peers: examples per micro-batch
# distsft packs rows x seq tokens per micro-batch; padded peers take pad_micro examples per micro-batch,
# padding-free peers as many examples as a distsft micro-batch holds (the same tokens: like-for-like memory)
SETUPS = {"alpaca": dict(seq=4096, rows=4, accum=2, pad_micro=16),
          "ultrachat": dict(seq=8192, rows=2, accum=2, pad_micro=4),
          "toy": dict(seq=256, rows=2, accum=2, pad_micro=4)}
SYSTEMS = ("distsft", "distsft_loop", "distsft_liger", "distsft_liger_loop", "trl_pad", "trl_padfree",
           "trl_padfree_liger", "trl_packing", "trl_packing_liger", "hf")


def setup(a) -> dict:
    """The data's batch layout; ``--rows`` changes distsft's rows per micro-batch, keeping rows x accumulation."""
    s = dict(SETUPS[a.data])
    if a.rows:
        per_step = s["rows"] * s["accum"]
        if per_step % a.rows:
            raise SystemExit(f"--rows {a.rows} must divide the {per_step} rows of a step")
        s["rows"], s["accum"] = a.rows, per_step // a.rows
    return s


def model_dir(name: str) -> Path:
    return ROOT / ("distsft/assets/tiny-llama" if name == "tiny" else f"bench/models/{name}")


def synth(data: str, n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    median, sigma, clip = DATA[data]
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(median), sigma, n).astype(int), 8, clip)
    ids, labels = [], []
    low = min(1000, vocab // 4)  # clear of special tokens and the pad id
    for n_tok in lengths:
        x = rng.integers(low, vocab, n_tok).tolist()
        prompt = max(1, int(round(0.3 * n_tok)))
        ids.append(x)
        labels.append([IGNORE] * prompt + x[prompt:])
    return ids, labels


def build_model(a, attn: str, kernels: str = "torch", distsft: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.model.attention import resolve_attention

    cfg = AutoConfig.from_pretrained(model_dir(a.model))
    cuda = a.device == "cuda"
    torch.manual_seed(0)
    # the precision contract of every system: full fine-tuning trains fp32 master weights under bf16 autocast
    # (distsft.model.precision); a frozen LoRA base is stored in bf16
    dtype = torch.bfloat16 if cuda and a.lora else torch.float32
    with torch.device(a.device):  # random weights made where they train (an 8B init on CPU takes minutes)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                 attn_implementation=resolve_attention(attn, cuda))
    model.config.use_cache = False
    from distsft.model.kernels import apply_kernels

    model = apply_kernels(model, kernels)
    if a.lora:
        from distsft.config import PeftConfig
        from distsft.model.peft import apply_peft

        # peft.fused_add is distsft's own forward: the peers run PEFT's (and distsft too with --no-fused-add)
        fused_add = distsft and not a.no_fused_add
        model = apply_peft(model, PeftConfig(method="lora", r=16, alpha=32, dropout=0.0, fused_add=fused_add),
                           gradient_checkpointing=True,
                           checkpoint_every=a.checkpoint_every if distsft else 1,
                           # the peers get distsft's PEFT setting under autocast (no fp32 copy of adapter inputs)
                           # unless --peers-peft-default asks for PEFT's own (the row is then labelled)
                           bf16_autocast=cuda and (distsft or not a.peers_peft_default))
    if distsft and a.fp8:  # after the adapters (they mark the frozen base), before compile, as model.build
        from distsft.model.fp8 import apply_fp8

        apply_fp8(model)
    if distsft and a.compile:
        from distsft.model.kernels import compile_layers

        compile_layers(model)
    return model


def tokenizer():
    from distsft.config import ModelConfig
    from distsft.model.load import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(model_dir("tiny"))))  # only its pad id is used


class Clock:
    """Intervals between consecutive optimizer-step ends, taken without stalling the steps: on CUDA each
    end is an event recorded in the stream (GPU time between them, idle gaps included), read after the
    run; on CPU the wall clock."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.start()

    def start(self):
        self.marks = [self._mark()]

    def tick(self):
        self.marks.append(self._mark())

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @property
    def times(self) -> list[float]:
        pairs = list(zip(self.marks, self.marks[1:]))
        if not self.cuda:
            return [b - a for a, b in pairs]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in pairs]


def run_distsft(a, ids, labels, n_steps: int) -> dict:
    from distsft.batch import resolve_batch
    from distsft.config import DataConfig, OptimConfig, ParallelConfig, TrainerConfig
    from distsft.data.collate import TokenStore
    from distsft.data.loader import StepLoader
    from distsft.data.packing import best_fit_decreasing
    from distsft.trainer.accelerator import build_accelerator
    from distsft.trainer.optim import build_optimizer
    from distsft.trainer.step import train_step

    s, cuda = setup(a), a.device == "cuda"
    plan = resolve_batch(s["rows"], s["accum"], None, 1)
    # --strategy: distsft's own parallel config group at world size 1 (ZeRO-3 and FSDP2 shard over one rank)
    par = ParallelConfig() if a.strategy == "ddp" else compose([f"parallel={a.strategy}"]).parallel
    acc = build_accelerator(par, TrainerConfig(precision="bf16" if cuda else "fp32", use_cuda=cuda,
                                               micro_batch_size=s["rows"], grad_accum=s["accum"]), plan)
    store = TokenStore(ids, labels)
    rows = best_fit_decreasing(store.lengths, s["seq"], 0)
    data_cfg = DataConfig(mode="pack", max_seq_len=s["seq"], num_workers=a.workers)
    loader = StepLoader(store, rows, plan, 0, data_cfg, pad_id=0, pin_memory=cuda)
    from distsft.model.load import whole_model

    with whole_model(acc):  # built whole, as distsft builds a random init (no zero.Init under ZeRO-3)
        model = build_model(a, "varlen", "liger" if "liger" in a.system else "torch", distsft=True)
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-5, weight_decay=0.0))
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model.train()
    results, examples = [], []  # read back after the run: no host sync in the timed steps
    clock = Clock(cuda)
    if a.system.endswith("_loop"):
        run_whole_loop(a, acc, model, optimizer, scheduler, loader, n_steps, clock, results, examples)
        return finish_distsft(clock, results, examples, acc.unwrap_model(model))
    prof = None
    for step, mbs in enumerate(loader.steps(0)):
        if a.profile and step == a.warmup:  # one step after warm-up, by CUDA time
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        res = train_step(model, mbs, acc, optimizer, scheduler, 1.0)
        clock.tick()
        if prof is not None and step == a.warmup:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
            Path(a.out, f"profile_{a.model}_{a.data}_{a.system}.txt").write_text(table)
        results.append((res.counts, res.loss_sum))
        examples.append(sum(len(mb["example_ids"]) for mb in mbs))
        if step + 1 == n_steps:
            break
    return finish_distsft(clock, results, examples, acc.unwrap_model(model))


def finish_distsft(clock, results, examples, model) -> dict:
    counts = [tuple(c.read()[k] for k in ("tokens", "supervised", "cells", "attn_sq")) for c, _ in results]
    losses = [float(loss) for _, loss in results]
    return dict(times=clock.times, counts=counts, losses=losses, examples=examples, model=model)


def run_whole_loop(a, acc, model, optimizer, scheduler, loader, n_steps, clock, results, examples) -> None:
    """distsft_loop: the trainer's whole ``loop.train`` (guards' late reads, the metrics window read every
    log_every=10 steps with its collective, TensorBoard scalars, the stop-file check), as the peers' whole loops
    are timed. Each step end is marked where ``train_step`` returns (a CUDA event: no sync), so the logging that
    follows a step is in the next step's time. The end-of-run checkpoint (after the last mark) is not written."""
    from distsft.config import LoggingConfig, TrainerConfig
    from distsft.trainer import loop as trainer_loop
    from distsft.trainer.checkpoint import TrainState

    inner = trainer_loop.train_step

    def marked(model_, mbs, *args, **kwargs):
        res = inner(model_, mbs, *args, **kwargs)
        clock.tick()
        results.append((res.counts, res.loss_sum))
        examples.append(sum(len(mb["example_ids"]) for mb in mbs))
        return res

    trainer_loop.train_step, trainer_loop._Loop.save = marked, lambda self, keep, name=None: None
    out = Path(tempfile.mkdtemp())
    parts = trainer_loop.LoopParts(acc, model, optimizer, scheduler, loader, None, TrainState(), n_steps, out, {})
    trainer_loop.train(parts, TrainerConfig(max_steps=n_steps, max_grad_norm=1.0, save_every=0, eval_every=0),
                       LoggingConfig(log_every=10, progress_bar=False, plot=False))


class Counting:
    """Wraps a peer's collator to count what each micro-batch holds (they are consumed in order)."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, features):
        out = self.inner(features)
        # a TRL-packed row holds several documents (its seq_lengths); otherwise one per feature
        lens = np.array([n for f in features for n in f.get("seq_lengths", [len(f["input_ids"])])], dtype=np.float64)
        self.seen.append((lens.sum(), float((out["labels"] != IGNORE).sum()), out["input_ids"].numel(),
                          (lens ** 2).sum(), len(lens)))
        return out


def peer_dataset(columns: dict):
    """The peers' datasets.Dataset with a fixed fingerprint: Dataset.from_dict would hash the whole Arrow table through
    dill, which on the GPU image (Python 3.12, dill 0.4.1) failed on pyarrow's MonthDayNano and kept the TRL rows from
    running. Later transforms that cannot be hashed get random fingerprints (datasets' own fallback)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable.from_pydict(columns), fingerprint="distsft-bench-" + "-".join(sorted(columns)))


def run_peer(a, system: str, ids, labels, n_steps: int, examples_per_step: float) -> dict:
    from transformers import TrainerCallback, TrainingArguments

    s, cuda = setup(a), a.device == "cuda"
    packing = system.startswith("trl_packing")  # TRL's recommendation: packing=True, BFD, padding-free rows
    padfree = system.startswith("trl_padfree") or packing
    micro = max(1, round(examples_per_step / s["accum"])) if padfree else s["pad_micro"]
    accum = max(1, round(examples_per_step / micro))
    if packing:  # the same rows as distsft: rows x seq tokens per micro-batch, the same accumulation
        micro, accum = s["rows"], s["accum"]
    tok = tokenizer()
    model = build_model(a, "varlen" if padfree else "sdpa")
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                  max_steps=n_steps, learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0,
                  max_grad_norm=1.0, bf16=cuda, use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
                  logging_steps=n_steps, logging_first_step=True, report_to="none", save_strategy="no",
                  disable_tqdm=True, seed=0, dataloader_num_workers=0, gradient_checkpointing=a.lora,
                  gradient_checkpointing_kwargs={"use_reentrant": False})
    clock = Clock(cuda)

    class Timer(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            clock.start()

        def on_step_end(self, *args, **kw):
            clock.tick()

    if system == "hf":
        from transformers import DataCollatorForSeq2Seq, Trainer

        collator = Counting(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE))
        ds = peer_dataset({"input_ids": ids, "labels": labels})
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=ds, data_collator=collator,
                          callbacks=[Timer()])
    else:
        from trl import SFTConfig, SFTTrainer

        ds = peer_dataset({"input_ids": ids, "completion_mask": [[int(y != IGNORE) for y in row] for row in labels]})
        # documents are already shorter than the row length; padding-free refuses a max_length without packing
        args = SFTConfig(**common, max_length=None if padfree and not packing else s["seq"], padding_free=padfree,
                         packing=packing, packing_strategy="bfd", completion_only_loss=True,
                         use_liger_kernel=system.endswith("_liger"))
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
        collator = trainer.data_collator = Counting(trainer.data_collator)  # TRL's own collator, counted
    trainer.train()
    seen = collator.seen
    counts = [tuple(map(sum, zip(*seen[k * accum:(k + 1) * accum])))[:4] for k in range(n_steps)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    examples = [sum(c[4] for c in seen[k * accum:(k + 1) * accum]) for k in range(n_steps)]
    return dict(times=clock.times, counts=counts, losses=losses, examples=examples, model=trainer.model)


def bench_data(a) -> tuple[list[list[int]], list[list[int]], int]:
    """(ids, labels, vocab): enough examples for every step of the run, the same in every process."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir(a.model)).vocab_size
    median, sigma, _ = DATA[a.data]
    s = setup(a)
    mean_len = median * math.exp(sigma ** 2 / 2)
    n = int(1.5 * (a.warmup + a.steps) * s["seq"] * s["rows"] * s["accum"] / mean_len) + 64
    return (*synth(a.data, n, vocab, seed=1), vocab)


def one(a) -> dict:
    """Run one system (in its own process) and return its figures."""
    cuda = a.device == "cuda"
    n_steps = a.warmup + a.steps
    ids, labels, vocab = bench_data(a)
    # before the accelerator: under ZeRO-3 its config would make the plan's meta-device model a zero.Init one
    est = memory_estimate(a) if a.system.startswith("distsft") else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if a.system.startswith("distsft"):
        r = run_distsft(a, ids, labels, n_steps)
    else:
        r = run_peer(a, a.system, ids, labels, n_steps, a.examples_per_step)
    model = r.pop("model")
    from distsft.trainer.metrics import model_flops

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_token, per_sq = model_flops(model, trainable, total)
    timed = slice(a.warmup, n_steps)
    t = r["times"][timed]
    real, sup, cells, attn_sq = (sum(c[i] for c in r["counts"][timed]) for i in range(4))
    flops = per_token * real + per_sq * attn_sq
    out = {"system": a.system, "model": a.model, "data": a.data, "lora": a.lora, "steps": len(t),
           "tokens_per_s": real / sum(t), "supervised_tokens_per_s": sup / sum(t),
           "mfu": flops / sum(t) / PEAK if cuda else None, "tflops": flops / sum(t) / 1e12,
           # torchtitan's convention counts attention as if it were not causal (twice the causal FLOPs)
           "mfu_noncausal": (flops + per_sq * attn_sq) / sum(t) / PEAK if cuda else None,
           "step_s_median": statistics.median(t), "step_s_min": min(t), "step_s_max": max(t),
           "real_per_computed": real / cells, "examples_per_step": statistics.mean(r["examples"][timed]),
           "tokens_per_step": real / len(t), "first_loss": r["losses"][0] if r["losses"] else None,
           "ln_vocab": math.log(vocab), "losses": r["losses"],
           "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "estimate_gib": est}
    if a.compile and a.system.startswith("distsft"):
        from distsft.model.kernels import compile_stats

        out["compile"] = compile_stats()
    return out


def compose(overrides: list[str]):
    """distsft's typed config for these Hydra overrides (what the trainer and distsft.plan would compose)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from distsft.checks import to_object
    from distsft.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(hydra_compose(config_name="config", overrides=overrides))


def memory_estimate(a) -> dict:
    """distsft.plan's estimate (GiB) for the distsft run of this benchmark, to compare with the measured peak."""
    from distsft.memory import memory_estimate as estimate
    from distsft.plan import model_shape

    s = setup(a)
    over = [f"model.name_or_path={model_dir(a.model)}", "model.init=config", f"data.max_seq_len={s['seq']}",
            f"trainer.micro_batch_size={s['rows']}", f"trainer.grad_accum={s['accum']}",
            "trainer.global_batch_size=null", f"model.gradient_checkpointing={str(a.lora).lower()}",
            f"model.checkpoint_every={a.checkpoint_every}",
            f"parallel={a.strategy}"]
    if a.device == "cuda":
        over += ["model.dtype=bfloat16", "trainer.precision=bf16"]
    if a.lora:
        over += ["peft=lora", "peft.dropout=0.0"]
    cfg = compose(over)
    est = estimate(cfg, model_shape(cfg), 1, s["rows"], fused_loss="liger" in a.system)
    return {k: v / 2**30 for k, v in est.items()}


def distsft_examples_per_step(a) -> float:
    """Mean examples per optimizer step of distsft's packing (what the peers are given)."""
    from distsft.data.packing import best_fit_decreasing

    s = setup(a)
    ids, _, _ = bench_data(a)
    rows = best_fit_decreasing(np.array([len(x) for x in ids]), s["seq"], 0)
    return sum(len(r) for r in rows) / len(rows) * s["rows"] * s["accum"]


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["system"] == "distsft" and "error" not in r), None)
    head = (f"{'system':<18} {'tok/s':>9} {'sup tok/s':>9} {'MFU':>6} {'MFU nc':>6} {'step s (min-max)':>18} "
            f"{'real/comp':>9} {'ex/step':>7} {'mem GiB':>8} {'loss0':>7} {'distsft x':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['system']:<18} failed: {r['error'].splitlines()[-1][:100] if r['error'] else '?'}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mfu_nc = f"{r['mfu_noncausal']:.1%}" if r.get("mfu_noncausal") is not None else "-"
        mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
        speed = f"{base['tokens_per_s'] / r['tokens_per_s']:.2f}" if base else "-"
        loss0 = f"{r['first_loss']:.3f}" if r["first_loss"] is not None else "-"
        lines.append(f"{r['system']:<18} {r['tokens_per_s']:>9,.0f} {r['supervised_tokens_per_s']:>9,.0f} "
                     f"{mfu:>6} {mfu_nc:>6} {r['step_s_median']:>7.3f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) "
                     f"{r['real_per_computed']:>9.1%} {r['examples_per_step']:>7.1f} {mem:>8} {loss0:>7} {speed:>9}")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3_2_1b", help="a folder of bench/models, or tiny")
    p.add_argument("--data", default="alpaca", choices=sorted(DATA))
    p.add_argument("--lora", action="store_true", help="LoRA r=16 on all linear layers + gradient checkpointing")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="distsft DataLoader workers")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="distsft with --lora: recompute every Nth layer only (model.checkpoint_every)")
    p.add_argument("--rows", type=int, default=0, help="distsft rows per micro-batch (rows x accumulation kept)")
    p.add_argument("--compile", action="store_true", help="distsft: torch.compile the decoder layers (model.compile)")
    p.add_argument("--fp8", action="store_true",
                   help="distsft: the decoder's matmuls in FP8 (model.fp8; a frozen LoRA base without weight "
                        "gradients)")
    p.add_argument("--no-fused-add", action="store_true",
                   help="distsft LoRA: PEFT's own adapter forward (peft.fused_add=false), to measure the lever")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "zero1", "zero2", "zero3", "fsdp"],
                   help="distsft: the parallel config group (world size 1: what sharding costs on one GPU)")
    p.add_argument("--profile", action="store_true", help="distsft: write a torch.profiler table of one step")
    p.add_argument("--peers-peft-default", action="store_true",
                   help="--lora: the peers keep PEFT's default fp32 cast of adapter inputs (distsft does not)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--system", help=argparse.SUPPRESS)  # child process: run this one system
    p.add_argument("--examples-per-step", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=int, default=420, help="seconds per system")
    return p.parse_args(argv)


def run_child(cmd: list[str], timeout: int, labels: dict) -> dict:
    """Run one benchmark child process; its ``RESULT {json}`` line, or ``labels`` with the error (stderr's tail, or
    the timeout), and the wall time either way."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        r = json.loads(found[-1][7:]) if found else {**labels, "error": proc.stderr.strip()[-2000:]}
    except subprocess.TimeoutExpired:
        r = {**labels, "error": f"timed out after {timeout}s"}
    r["wall_s"] = time.time() - t0
    return r


def main(argv=None) -> list[dict]:
    a = parse(argv)
    if a.system:
        print("RESULT " + json.dumps(one(a)), flush=True)
        return []
    eps = distsft_examples_per_step(a)
    results = []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    variant = (f"_ckpt{a.checkpoint_every}" if a.checkpoint_every > 1 else "") + (f"_rows{a.rows}" if a.rows else "") \
        + ("_compile" if a.compile else "") + ("_fp8" if a.fp8 else "") + ("_no_fused_add" if a.no_fused_add else "") \
        + ("_peers_peft_default" if a.peers_peft_default else "") \
        + (f"_{a.strategy}" if a.strategy != "ddp" else "")  # one file per variant
    tag = f"{a.model}_{a.data}{'_lora' if a.lora else ''}{variant}"
    for system in a.systems.split(","):
        cmd = [sys.executable, __file__, "--system", system, "--examples-per-step", str(eps),
               "--model", a.model, "--data", a.data, "--warmup", str(a.warmup), "--steps", str(a.steps),
               "--workers", str(a.workers), "--device", a.device, "--out", str(a.out)] + \
            (["--lora"] if a.lora else []) + (["--profile"] if a.profile else []) + \
            ["--checkpoint-every", str(a.checkpoint_every), "--rows", str(a.rows)] + \
            (["--compile"] if a.compile else []) + (["--fp8"] if a.fp8 else []) + \
            (["--no-fused-add"] if a.no_fused_add else []) + \
            (["--peers-peft-default"] if a.peers_peft_default else []) + ["--strategy", a.strategy]
        r = run_child(cmd, a.timeout, {"system": system})
        results.append(r)
        (out / f"throughput_{tag}.json").write_text(json.dumps(results, indent=1))  # kept if a later one hangs
        shown = f"{r['tokens_per_s']:,.0f} tok/s" if "error" not in r else "\n  ".join(r["error"].splitlines()[-3:])
        print(f"{system}: " + shown, flush=True)
    peers = " (peers: PEFT's fp32 cast of adapter inputs)" if a.lora and a.peers_peft_default else ""
    where = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"\n{a.model} {'LoRA r=16 + checkpointing' if a.lora else 'full fine-tune'}{peers}, {a.data}-like data, "
          f"{a.steps} timed steps after {a.warmup} warm-up, {where}")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
