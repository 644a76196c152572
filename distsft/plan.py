"""Plan (dry run): ``python -m distsft.plan key=value ...`` (console script ``distsft-plan``).

On the same composed config as training, without training: the data after formatting and
filtering, the batch arithmetic, steps, warmup, example views, the LR curve, FLOPs per token and an
estimated peak memory per GPU. The model is built on the meta device (no weights are loaded). For a
mixture-of-experts model the parameters are counted twice: all of them (memory) and the ones a token
passes through (FLOPs and MFU: the non-expert weights and top_k/num_experts of the expert weights).

The memory estimate, the activation-checkpointing options and the longest row that fits come from
``distsft.memory`` (its docstring gives the formulas); this module composes the data, the batch arithmetic
and the model's shape, and prints them. With ``plan.cluster`` it also ranks every layout (ddp, ZeRO, hpZ, FSDP, HSDP,
tensor and sequence parallel) on that cluster and prints the best one's overrides: ``distsft.layouts``, over the
communication model of ``distsft.comm``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

import hydra
from omegaconf import DictConfig

from .batch import BatchPlan, resolve_batch
from .comm import cluster_of
from .config import Config, register_configs
from .layouts import plan_layouts, render_layouts
from .memory import (
    ASSUMED_MFU,
    GIB,
    HEADROOM,
    QUADRATIC,
    ModelShape,
    checkpoint_bytes,
    checkpointing_options,
    longest_sequences,
    memory_estimate,
    suggest_checkpointing,
)
from .train import CONF_DIR, with_user_errors
from .trainer.strategy import shard_group

register_configs()


def model_shape(cfg: Config) -> ModelShape:
    """Parameter counts on the meta device: no weights are read or allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    from .model.load import load_config
    from .model.moe import active_parameters
    from .model.params import count_parameters
    from .model.peft import apply_peft
    from .model.source import loading

    mc = load_config(cfg.model)
    with torch.device("meta"), loading("model.name_or_path", cfg.model.name_or_path, "model"):
        model = AutoModelForCausalLM.from_config(mc, trust_remote_code=cfg.model.trust_remote_code)
    quantizable = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    if cfg.peft.method != "none":
        model = apply_peft(model, type(cfg.peft)(**{**asdict(cfg.peft), "quantize": "none"}), False)
    trainable, params = count_parameters(model)
    active = active_parameters(model)
    heads = mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // heads
    kv_heads = getattr(mc, "num_key_value_heads", None) or heads
    kv = kv_heads * head_dim
    from .trainer.metrics import model_flops

    # FLOPs of the weights a token passes through (total=active: an MoE token meets top_k experts, not all);
    # "every weight trains" (6N, not 4N) still means full fine-tuning
    flops = model_flops(model, active if trainable == params else trainable, active)[0]
    return ModelShape(params, trainable, quantizable, mc.num_hidden_layers, mc.hidden_size, kv,
                      mc.intermediate_size, mc.vocab_size, flops, active, mc.model_type, heads, kv_heads)


def gpu_memory(cfg: Config) -> float | None:
    """plan.gpu_memory_gib, else plan.cluster's GPU, else this machine's."""
    if cfg.plan.gpu_memory_gib:
        return cfg.plan.gpu_memory_gib * GIB
    if cfg.plan.cluster:
        return cluster_of(cfg.plan).memory_gib * GIB
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def lr_table(cfg: Config, total: int, points: int = 10) -> list[tuple[float, int, float]]:
    """(percent of training, step, LR) at ``points`` + 1 evenly spaced places."""
    from .trainer.schedule import lr_factor

    rows = []
    for k in range(points + 1):
        pct = 100 * k / points
        step = min(total - 1, round(pct / 100 * (total - 1)))
        rows.append((pct, step, cfg.optim.lr * lr_factor(step, cfg.schedule, total)))
    return rows


def make_plan(cfg: Config, world_size: int) -> dict:
    """Everything the plan prints, as a dict (also written by tests)."""
    from .data.loader import StepLoader, pack
    from .data.prepare import prepare
    from .model.load import load_tokenizer
    from .trainer.schedule import warmup_steps

    plan = resolve_batch(cfg.trainer.micro_batch_size, cfg.trainer.grad_accum, cfg.trainer.global_batch_size,
                         world_size, cfg.parallel.sp_size, cfg.parallel.tp_size)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.model.tokenizer or cfg.model.name_or_path)
    # the trainer's own step arithmetic (no DataLoader is created until steps() is iterated)
    loader = StepLoader(data.train, pack(data.train, cfg.data, data.train_stats), plan, 0, cfg.data,
                        tokenizer.pad_token_id)
    st = data.train_stats
    per_epoch = loader.steps_per_epoch
    total = loader.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps)
    epochs = total / per_epoch
    shape = model_shape(cfg)
    from .model.attention import configured_attention
    from .model.kernels import resolve_kernels

    kernels = resolve_kernels(cfg.model.kernels, cuda=True, sharded=cfg.parallel.shards_parameters,
                              model_type=shape.model_type, sequence_parallel=cfg.parallel.sequence_parallel)[0]
    # the ranks memory divides the model's state by: the data-parallel ones (memory_estimate divides by tp itself),
    # under fsdp HSDP's group (a node's when plan.cluster says what a node is)
    n = world_size // cfg.parallel.tp_size
    if cfg.parallel.strategy == "fsdp":
        node = cluster_of(cfg.plan).gpus_per_node if cfg.plan.cluster else world_size
        n = shard_group(cfg.parallel, world_size, node)
    options = checkpointing_options(cfg, shape, n, plan.micro_batch_size, kernels == "liger")
    gpu = gpu_memory(cfg)
    return {
        "data": st.as_dict(), "eval": data.eval_stats.as_dict() if data.eval_stats else None,
        "batch": asdict(plan), "steps_per_epoch": per_epoch, "total_steps": total, "epochs": epochs,
        "warmup_steps": warmup_steps(cfg.schedule, total),
        "example_views": round(st.kept * epochs), "lr_curve": lr_table(cfg, total),
        "parameters": {"total": shape.params, "trainable": shape.trainable, "active": shape.active},
        "flops_per_token": shape.flops_per_token,
        "kernels": kernels,
        "attention": configured_attention(cfg, cuda=True),
        "fp8": cfg.model.fp8,
        "memory_per_gpu_bytes": memory_estimate(cfg, shape, n, plan.micro_batch_size, kernels == "liger",
                                               plan.grad_accum),
        "checkpointing": options,
        "gpu_memory_bytes": gpu,
        "suggested_checkpointing": suggest_checkpointing(options, gpu),
        "longest": longest_sequences(cfg, shape, n, kernels == "liger", gpu, plan_peak(cfg),
                                     cfg.plan.host_memory_gib * GIB if cfg.plan.host_memory_gib else None)
        if gpu else None,
        "host_memory_bytes": cfg.plan.host_memory_gib * GIB if cfg.plan.host_memory_gib else None,
        "peak_flops": plan_peak(cfg),
        "checkpoint_bytes": checkpoint_bytes(cfg, shape, world_size),
        "checkpoint_gbps": (cfg.plan.checkpoint_gbps, cfg.plan.stage_gbps),
        "layouts": plan_layouts(cfg, shape, cluster_of(cfg.plan), cfg.plan.cluster, plan.global_batch_size,
                                plan_peak(cfg), sup_share=st.supervised_tokens / max(st.tokens, 1))
        if cfg.plan.cluster else None,
    }


def plan_peak(cfg: Config) -> float:
    """logging.peak_flops, else plan.cluster's GPU, else this machine's GPU, else an H100/H200's dense bf16 peak."""
    from .trainer.metrics import peak_flops

    cluster = cluster_of(cfg.plan)
    return peak_flops(cfg.logging.peak_flops or (cluster.peak_tflops * 1e12 if cluster else None)) or 989e12


def render(p: dict) -> str:
    b, d, mem = p["batch"], p["data"], p["memory_per_gpu_bytes"]
    lines = [
        f"data: {d['kept']:,} examples kept of {d['rows_in']:,} (dropped {d['dropped_overlong']} over-long, "
        f"{d['dropped_short']} short, {d['dropped_unsupervised']} unsupervised), {d['tokens']:,} tokens "
        f"({d['supervised_tokens']:,} supervised) in {d['sequences']:,} sequences, packing efficiency "
        f"{(d['packing_efficiency'] or 0):.1%}",
        f"batch: {BatchPlan(**b).describe()} sequences",
        f"steps: {p['steps_per_epoch']} per epoch, {p['total_steps']} in all ({p['epochs']:.2f} epochs), "
        f"{p['warmup_steps']} warmup; example views {p['example_views']:,}",
        f"parameters: {p['parameters']['trainable']:,} trainable of {p['parameters']['total']:,}"
        f"{_active(p['parameters'])}; {p['flops_per_token']:.3g} FLOPs per token (+ attention)",
        "LR:  " + "  ".join(f"{pct:g}%:{lr:.2e}" for pct, _, lr in p["lr_curve"]),
        f"memory per GPU on CUDA (estimate, kernels={p['kernels']}, attention={p['attention']}): "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in mem.items()),
        "activation checkpointing (memory, extra compute): " + "; ".join(
            f"{_every(o['checkpoint_every'])} {o['memory'] / GIB:.1f} GiB +{o['extra_compute']:.0%}"
            for o in p["checkpointing"]),
    ]
    if p["attention"] in QUADRATIC and mem["attention"] > 0.01 * mem["total"]:
        lines.append(f"  attention={p['attention']} holds [T, T] {'masks' if p['attention'] == 'sdpa' else 'scores'}"
                     f" per layer, quadratic in data.max_seq_len: model.attn_implementation=varlen (bf16 on CUDA) "
                     f"or flash_attention_2 keep attention linear")
    best, gpu = p["suggested_checkpointing"], p["gpu_memory_bytes"]
    if gpu:
        lines.append(f"  fits {HEADROOM:.0%} of {gpu / GIB:.3g} GiB with the least recompute: " + (
            _overrides(best["checkpoint_every"]) if best else "nothing: lower trainer.micro_batch_size or "
            "data.max_seq_len, or shard more (parallel=zero2|zero3|fsdp)"))
    if p.get("longest"):
        lines.append(f"longest data.max_seq_len in {HEADROOM:.0%} of {gpu / GIB:.3g} GiB (one row per micro-batch, "
                     f"sp_size {b.get('sp_size', 1)}; step time at {ASSUMED_MFU:.0%} MFU of "
                     f"{p['peak_flops'] / 1e12:.0f} TFLOP/s" + (
                         f"; offload within {HEADROOM:.0%} of {p['host_memory_bytes'] / GIB:.3g} GiB host memory"
                         if p.get("host_memory_bytes") else "") + (
                         "; at the bf16 rate: model.fp8's FP8 matmuls may run faster" if p.get("fp8") else "") + "):")
        for o in p["longest"]:
            lines.append(f"  {o['option']:<28} " + (
                f"{o['max_seq_len']:>10,} tokens  {o['memory'] / GIB:.3g} GiB  +{o['extra_compute']:.0%} compute  "
                + (f"+{o['host_memory'] / GIB:.3g} GiB host, {o['transfer_seconds']:.3g} s copies  "
                   if o["host_memory"] else "") +
                f"~{o['seconds_per_row']:.3g} s per row, {o['tokens_per_s_per_gpu']:,.0f} tok/s per GPU  "
                + " ".join(f"model.{k}={str(v).lower()}" for k, v in o["overrides"].items())
                if o["max_seq_len"] else "nothing fits"))
    lines.append(checkpoint_line(p["checkpoint_bytes"], *p["checkpoint_gbps"]))
    if p.get("layouts"):
        lines += render_layouts(p["layouts"])
    return "\n".join(lines)


def checkpoint_line(per_rank: list[float], write_gbps: float, stage_gbps: float) -> str:
    """The checkpoint's size, the busiest rank's share, and how long a save holds the loop, sync and async."""
    busiest = max(per_rank)
    sync, staged = busiest / 1e9 / write_gbps, busiest / 1e9 / stage_gbps
    grace = 2 * sync + 30
    return (f"checkpoint: {sum(per_rank) / 1e9:.3g} GB, {busiest / 1e9:.3g} GB from the busiest rank; a save holds "
            f"the loop ~{sync:.3g} s at {write_gbps:g} GB/s (plan.checkpoint_gbps), ~{staged:.3g} s with "
            f"trainer.async_save (staged at {stage_gbps:g} GB/s into as much host memory, plan.stage_gbps); a "
            f"preemption needs TORCH_ELASTIC_SHUTDOWN_TIMEOUT >= {grace:.0f} s (and the scheduler's grace)")


def _active(counts: dict) -> str:
    """An MoE's parameters per token (what its FLOPs and MFU count), when they are not all of them."""
    if counts["active"] == counts["total"]:
        return ""
    return f" ({counts['active']:,} active per token: the routed experts count top_k of num_experts)"


def _every(every: int | None) -> str:
    if every is None:
        return "off"
    return "every layer" if every == 1 else f"every {every}{'nd' if every == 2 else 'th'} layer"


def _overrides(every: int | None) -> str:
    return "model.gradient_checkpointing=false" if every is None else \
        f"model.gradient_checkpointing=true model.checkpoint_every={every}"


def plan_main(cfg: Config) -> None:
    import os

    from .checks import check_model_paths

    check_model_paths(cfg)
    cluster = cluster_of(cfg.plan)  # its GPUs are the world the plan assumes
    world = int(os.environ.get("WORLD_SIZE", cluster.world if cluster else cfg.plan.world_size))
    p = make_plan(cfg, world)
    print(render(p), file=sys.stdout)
    if cfg.plan.lr_plot:
        from .plots import lr_curve

        points = lr_table(cfg, p["total_steps"], points=min(p["total_steps"], 200))
        path = lr_curve([(step, lr) for _, step, lr in points], cfg.plan.lr_plot,
                        f"{cfg.schedule.name} schedule, {p['warmup_steps']} warmup of {p['total_steps']} steps")
        print(f"LR curve: {path}", file=sys.stdout)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    with_user_errors(plan_main, cfg)


if __name__ == "__main__":
    main()
