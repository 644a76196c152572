"""Plan (dry run): ``python -m distsft.plan key=value ...`` (console script ``distsft-plan``).

On the same composed config as training, without training: the data after formatting and
filtering, the batch arithmetic, steps, warmup, example views, the LR curve, FLOPs per token and an
estimated peak memory per GPU. The model is built on the meta device (no weights are loaded). For a
mixture-of-experts model the parameters are counted twice: all of them (memory) and the ones a token
passes through (FLOPs and MFU: the non-expert weights and top_k/num_experts of the expert weights).

Memory per GPU, in bytes (P parameters, T trainable, N ranks, w bytes per weight):

    weights      (P-T)*w + T*4: trainable weights are fp32 masters under every precision (frozen 4-bit linear
                 weights: ~0.52 bytes with double quantisation, 0.56 without)
    gradients    T*4
    optimizer    T*8 for AdamW (two fp32 moments); T*2 for 8-bit; ~0 Adafactor
    DeepSpeed    bf16 keeps fp32 master weights + moments in the optimizer: 12*T, weights/grads in 2 -> the
                 ZeRO paper's 16*P for full fine-tuning; ZeRO-1 shards the optimizer (/N), ZeRO-2 also
                 gradients, ZeRO-3 also weights; offload moves the optimizer (and ZeRO-3 weights) to CPU
    activations  per token per layer (7h + 2*kv + 4i) * a bytes for a Llama block with SDPA (a: 2 in bf16,
                 4 in fp32); with gradient checkpointing only the layer input h*a is kept, plus one layer;
                 with model.offload_checkpoints those inputs live in host memory (two in flight on the GPU)
    logits       per token V*(2a + 8): the logits and their gradient, the log-softmax kept for backward and
                 its fp32 gradient, for the positions whose logits exist together: every position with
                 trainer.loss_head=full, at most trainer.loss_chunk supervised ones with the default supervised
                 head (model.head); with model.kernels=liger no logits (chunked), only V*h*a for the head's gradient

Under sequence parallelism (``parallel.sp_size=S``) a rank holds T/S tokens of each row, so its activations and
logits are those of max_seq_len/S tokens per row; ZeRO still shards over every rank (N is the world size).

These are estimates (allocator fragmentation, CUDA context and temporary buffers are not counted).

Activation checkpointing options: the estimate without it and with every 1st/2nd/4th/8th layer
recomputed, with the compute each adds (a recomputed forward is 1/3 of a full fine-tuning step's
FLOPs, 1/2 of a frozen-base one's); given ``plan.gpu_memory_gib`` (or a visible GPU) the least
recompute whose estimate fits in 85% of it is suggested (the estimate is good to ~10%).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace

import hydra
from omegaconf import DictConfig

from .batch import BatchPlan, resolve_batch
from .config import Config, register_configs
from .train import CONF_DIR, with_user_errors

register_configs()
GIB = 2**30
HEADROOM = 0.85  # of the GPU's memory, for what the estimate leaves out


@dataclass
class ModelShape:
    params: int
    trainable: int
    quantizable: int  # weights of linear layers but the output head (what bitsandbytes quantises)
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int
    flops_per_token: float = 0.0  # as train/mfu counts it (trainer.metrics.model_flops)
    active: int = 0  # parameters one token passes through (an MoE: top_k of num_experts experts; else params)
    model_type: str = ""


def model_shape(cfg: Config) -> ModelShape:
    """Parameter counts on the meta device: no weights are read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model.moe import active_parameters
    from .model.params import count_parameters
    from .model.peft import apply_peft

    mc = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                    trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mc, trust_remote_code=cfg.model.trust_remote_code)
    quantizable = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    if cfg.peft.method != "none":
        model = apply_peft(model, type(cfg.peft)(**{**asdict(cfg.peft), "quantize": "none"}), False)
    trainable, params = count_parameters(model)
    active = active_parameters(model)
    heads = mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // heads
    kv = getattr(mc, "num_key_value_heads", heads) * head_dim
    from .trainer.metrics import model_flops

    # FLOPs of the weights a token passes through (total=active: an MoE token meets top_k experts, not all);
    # "every weight trains" (6N, not 4N) still means full fine-tuning
    flops = model_flops(model, active if trainable == params else trainable, active)[0]
    return ModelShape(params, trainable, quantizable, mc.num_hidden_layers, mc.hidden_size, kv,
                      mc.intermediate_size, mc.vocab_size, flops, active, mc.model_type)


def memory_estimate(cfg: Config, shape: ModelShape, world_size: int, micro_batch: int,
                    fused_loss: bool = False) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring). ``fused_loss``: Liger's fused linear
    cross-entropy (model.kernels=liger) never holds the logits."""
    from .model.precision import half_compute

    p, t, n = shape.params, shape.trainable, world_size
    par, peft, optim = cfg.parallel, cfg.peft, cfg.optim.name
    ds_bf16 = par.strategy == "deepspeed" and cfg.trainer.precision == "bf16"  # the engine casts to bf16
    w = 2 if cfg.model.dtype == "bfloat16" or ds_bf16 else 4  # frozen weights: the storage dtype
    a = 2 if half_compute(cfg) else 4
    frozen = p - t
    weights = float(frozen * w + t * 4)  # trainable weights are fp32 masters (the precision contract)
    if peft.quantize == "nf4":
        weights = (frozen - shape.quantizable) * 2 + shape.quantizable * (0.516 if peft.double_quant else 0.5625) \
            + t * 4
    elif peft.quantize == "int8":
        weights = (frozen - shape.quantizable) * 2 + shape.quantizable * 1.0 + t * 4
    grads = float(t * 4)
    per_state = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "adafactor": 0.1}[optim]
    opt = float(t * per_state)
    if cfg.trainer.precision == "bf16_pure":  # bf16 weights, gradients and AdamW moments (ddp only)
        weights, grads, opt = float(frozen * w + t * 2), float(t * 2), float(t * per_state / 2)
    if par.strategy == "deepspeed":
        if ds_bf16:  # bf16 weights/grads of the trainable part in the engine, fp32 masters + moments in its optimizer
            weights, grads, opt = weights - t * 2, float(t * 2), float(t * (4 + per_state))
        stage = par.zero_stage
        opt = 0.0 if par.offload_optimizer else opt / n
        grads = grads / n if stage >= 2 else grads
        if stage == 3:
            weights = 0.0 if par.offload_params else weights / n
    elif par.strategy == "fsdp":
        weights, grads, opt = weights / n, grads / n, opt / n
    tokens = micro_batch * cfg.data.max_seq_len / par.sp_size  # a sequence-parallel rank holds a slice of each row
    # model.tiled_mlp_shards: the MLP's intermediates exist for one chunk of the sequence at a time
    per_layer = (7 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate / max(1, cfg.model.tiled_mlp_shards)) * a
    if cfg.model.gradient_checkpointing:  # recomputed layers keep their input; the others everything
        recomputed = recomputed_layers(shape.layers, cfg.model.checkpoint_every)
        kept = min(recomputed, 2) if cfg.model.offload_checkpoints else recomputed  # offloaded: one in flight
        acts = tokens * (kept * shape.hidden * a + (shape.layers - recomputed) * per_layer + per_layer)
    else:
        acts = tokens * shape.layers * per_layer
    head_grad = shape.vocab * shape.hidden * a if t == p else 0  # Liger's own buffer for the head's gradient
    at_once = tokens  # positions whose logits exist together
    if cfg.trainer.loss_head == "supervised" and cfg.trainer.loss_chunk:
        at_once = min(tokens, cfg.trainer.loss_chunk)  # model.head: one chunk of supervised positions at a time
    logits = head_grad if fused_loss else at_once * shape.vocab * (2 * a + 8)
    out = {"weights": weights, "gradients": grads, "optimizer": opt, "activations": float(acts),
           "logits": float(logits)}
    out["total"] = sum(out.values())
    return out


def offloaded_bytes(cfg: Config, shape: ModelShape, micro_batch: int) -> float:
    """Bytes of recomputed layers' inputs that model.offload_checkpoints keeps in host memory, per rank and
    micro-batch (pinned RAM it needs; each crosses PCIe twice a step)."""
    if not (cfg.model.gradient_checkpointing and cfg.model.offload_checkpoints):
        return 0.0
    from .model.precision import half_compute

    tokens = micro_batch * cfg.data.max_seq_len / cfg.parallel.sp_size
    return tokens * recomputed_layers(shape.layers, cfg.model.checkpoint_every) * shape.hidden * (
        2 if half_compute(cfg) else 4)


def recomputed_layers(layers: int, every: int) -> int:
    """Layers 0, every, 2*every, ... are recomputed (model.checkpoint_every, peft.checkpoint_only_every)."""
    return -(-layers // every)


def checkpointing_options(cfg: Config, shape: ModelShape, world_size: int, micro_batch: int,
                          fused_loss: bool) -> list[dict]:
    """Peak memory (bytes) and extra compute (fraction of a step) without activation checkpointing and
    with every 1st, 2nd, 4th and 8th layer recomputed."""
    forward_share = 1 / 2 if shape.trainable < shape.params else 1 / 3
    out = []
    for every in (None, 1, 2, 4, 8):
        if every is not None and every > shape.layers:
            break
        model = replace(cfg.model, gradient_checkpointing=every is not None, checkpoint_every=every or 1)
        memory = memory_estimate(replace(cfg, model=model), shape, world_size, micro_batch, fused_loss)["total"]
        share = recomputed_layers(shape.layers, every) / shape.layers if every else 0.0
        out.append({"checkpoint_every": every, "memory": memory, "extra_compute": share * forward_share})
    return out


def mlp_share(shape: ModelShape) -> float:
    """The decoder MLP's share of a layer's weight FLOPs (what tiled MLP computes once more per step)."""
    mlp, attn = 3 * shape.hidden * shape.intermediate, 2 * shape.hidden * (shape.hidden + shape.kv_dim)
    return mlp / (mlp + attn)


# the memory savers for long rows, cumulatively: (name, ModelConfig overrides)
SAVERS = (("as configured", {}),
          ("+ checkpointing", {"gradient_checkpointing": True, "checkpoint_every": 1}),
          ("+ checkpointing + tiled MLP", {"gradient_checkpointing": True, "checkpoint_every": 1,
                                           "tiled_mlp_shards": 8}),
          ("+ checkpoint offload", {"gradient_checkpointing": True, "checkpoint_every": 1,
                                    "tiled_mlp_shards": 8, "offload_checkpoints": True}))
ASSUMED_MFU = 0.4  # the step-time prediction's utilisation (distsft measured 32-43% on an H200, bench/README.md)
# host <-> GPU copies of offloaded checkpoints (pinned memory, PCIe Gen5 x16 as on H100/H200 SXM boards: ~55 GB/s
# peak one way); assumed, not measured by distsft yet, and the copies are not overlapped with compute
HOST_BANDWIDTH = 40e9


def longest_sequences(cfg: Config, shape: ModelShape, world_size: int, fused_loss: bool, gpu_bytes: float,
                      peak: float, host_bytes: float | None = None) -> list[dict]:
    """For each saver (cumulative), the longest data.max_seq_len (a multiple of 256 x sp) whose estimate with
    one row per micro-batch fits HEADROOM of ``gpu_bytes`` (and its offloaded checkpoints HEADROOM of ``host_bytes``,
    when given), its memory, and the step time per row predicted
    at ASSUMED_MFU of ``peak`` (weights 'flops_per_token' x T, causal attention 6 x layers x hidden x T^2/2 x 2,
    recompute and tiled MLP added; a row's work is shared by its sp ranks; offloaded checkpoints add their host
    copies, out and back, at HOST_BANDWIDTH)."""
    sp, unit = cfg.parallel.sp_size, 256 * cfg.parallel.sp_size
    forward_share = 1 / 2 if shape.trainable < shape.params else 1 / 3
    out = []
    for name, overrides in SAVERS:
        model = replace(cfg.model, **{k: max(v, cfg.model.tiled_mlp_shards) if k == "tiled_mlp_shards" else v
                                      for k, v in overrides.items()})
        c = replace(cfg, model=model)

        def memory(t: int) -> float:
            return memory_estimate(replace(c, data=replace(c.data, max_seq_len=t)), shape, world_size, 1,
                                   fused_loss)["total"]

        def fits(t: int) -> bool:
            host = offloaded_bytes(replace(c, data=replace(c.data, max_seq_len=t)), shape, 1)
            return memory(t) <= HEADROOM * gpu_bytes and (not host_bytes or host <= HEADROOM * host_bytes)

        lo, hi = 0, unit
        while fits(hi) and hi < 2 ** 27:
            lo, hi = hi, hi * 2
        while hi - lo > unit:  # memory grows with the length: bisect between a fit and a miss
            mid = (lo + hi) // 2 // unit * unit
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        extra = (forward_share if model.gradient_checkpointing else 0.0) + (
            forward_share * mlp_share(shape) if model.tiled_mlp_shards else 0.0)
        flops = (shape.flops_per_token * lo + 6 * shape.layers * shape.hidden * lo * lo) * (1 + extra)
        host = offloaded_bytes(replace(c, data=replace(c.data, max_seq_len=lo)), shape, 1)
        seconds = flops / (sp * peak * ASSUMED_MFU) + 2 * host / HOST_BANDWIDTH if lo else None
        out.append({"option": name, "overrides": overrides, "max_seq_len": lo, "memory": memory(lo) if lo else None,
                    "host_memory": host, "transfer_seconds": 2 * host / HOST_BANDWIDTH,
                    "extra_compute": extra, "seconds_per_row": seconds,
                    "tokens_per_s_per_gpu": lo / (seconds * sp) if lo else None})
    return out


def suggest_checkpointing(options: list[dict], gpu_bytes: float | None) -> dict | None:
    """The option with the least recompute whose estimate fits in HEADROOM of the GPU (None if none fits)."""
    if not gpu_bytes:
        return None
    fits = [o for o in options if o["memory"] <= HEADROOM * gpu_bytes]
    return min(fits, key=lambda o: o["extra_compute"]) if fits else None


def gpu_memory(cfg: Config) -> float | None:
    if cfg.plan.gpu_memory_gib:
        return cfg.plan.gpu_memory_gib * GIB
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
                         world_size, cfg.parallel.sp_size)
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
    from .model.kernels import resolve_kernels

    kernels = resolve_kernels(cfg.model.kernels, cuda=True, sharded=cfg.parallel.shards_parameters,
                              model_type=shape.model_type, sequence_parallel=cfg.parallel.sequence_parallel)[0]
    options = checkpointing_options(cfg, shape, world_size, plan.micro_batch_size, kernels == "liger")
    gpu = gpu_memory(cfg)
    return {
        "data": st.as_dict(), "eval": data.eval_stats.as_dict() if data.eval_stats else None,
        "batch": asdict(plan), "steps_per_epoch": per_epoch, "total_steps": total, "epochs": epochs,
        "warmup_steps": warmup_steps(cfg.schedule, total),
        "example_views": round(st.kept * epochs), "lr_curve": lr_table(cfg, total),
        "parameters": {"total": shape.params, "trainable": shape.trainable, "active": shape.active},
        "flops_per_token": shape.flops_per_token,
        "kernels": kernels,
        "memory_per_gpu_bytes": memory_estimate(cfg, shape, world_size, plan.micro_batch_size, kernels == "liger"),
        "checkpointing": options,
        "gpu_memory_bytes": gpu,
        "suggested_checkpointing": suggest_checkpointing(options, gpu),
        "longest": longest_sequences(cfg, shape, world_size, kernels == "liger", gpu, plan_peak(cfg),
                                     cfg.plan.host_memory_gib * GIB if cfg.plan.host_memory_gib else None)
        if gpu else None,
        "host_memory_bytes": cfg.plan.host_memory_gib * GIB if cfg.plan.host_memory_gib else None,
        "peak_flops": plan_peak(cfg),
    }


def plan_peak(cfg: Config) -> float:
    """logging.peak_flops, else this machine's GPU, else an H100/H200's dense bf16 peak."""
    from .trainer.metrics import peak_flops

    return peak_flops(cfg.logging.peak_flops) or 989e12


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
        f"memory per GPU on CUDA (estimate, kernels={p['kernels']}): " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in mem.items()),
        "activation checkpointing (memory, extra compute): " + "; ".join(
            f"{_every(o['checkpoint_every'])} {o['memory'] / GIB:.1f} GiB +{o['extra_compute']:.0%}"
            for o in p["checkpointing"]),
    ]
    best, gpu = p["suggested_checkpointing"], p["gpu_memory_bytes"]
    if gpu:
        lines.append(f"  fits {HEADROOM:.0%} of {gpu / GIB:.0f} GiB with the least recompute: " + (
            _overrides(best["checkpoint_every"]) if best else "nothing: lower trainer.micro_batch_size or "
            "data.max_seq_len, or shard more (parallel=zero2|zero3|fsdp)"))
    if p.get("longest"):
        lines.append(f"longest data.max_seq_len in {HEADROOM:.0%} of {gpu / GIB:.3g} GiB (one row per micro-batch, "
                     f"sp_size {b.get('sp_size', 1)}; step time at {ASSUMED_MFU:.0%} MFU of "
                     f"{p['peak_flops'] / 1e12:.0f} TFLOP/s" + (
                         f"; offload within {HEADROOM:.0%} of {p['host_memory_bytes'] / GIB:.3g} GiB host memory"
                         if p.get("host_memory_bytes") else "") + "):")
        for o in p["longest"]:
            lines.append(f"  {o['option']:<28} " + (
                f"{o['max_seq_len']:>10,} tokens  {o['memory'] / GIB:.3g} GiB  +{o['extra_compute']:.0%} compute  "
                + (f"+{o['host_memory'] / GIB:.3g} GiB host, {o['transfer_seconds']:.3g} s copies  "
                   if o["host_memory"] else "") +
                f"~{o['seconds_per_row']:.3g} s per row, {o['tokens_per_s_per_gpu']:,.0f} tok/s per GPU  "
                + " ".join(f"model.{k}={str(v).lower()}" for k, v in o["overrides"].items())
                if o["max_seq_len"] else "nothing fits"))
    return "\n".join(lines)


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
    world = int(os.environ.get("WORLD_SIZE", cfg.plan.world_size))
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
