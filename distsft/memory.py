"""Plan stage (memory model): the peak memory per GPU of a configuration, and the longest row that fits.

What distsft.plan prints about memory, as functions of the composed config and the model's shape (no weights).

Memory per GPU, in bytes (P parameters, T trainable, N ranks, w bytes per weight):

    weights      (P-T)*w + T*4: trainable weights are fp32 masters under every precision (frozen 4-bit linear
                 weights: ~0.52 bytes with double quantisation, 0.56 without)
    gradients    T*4 (under bf16 they are summed over micro-batches and reduced in fp32 on every strategy;
                 trainer.grad_dtype=bfloat16: T*2 where the engine keeps them, ZeRO's and FSDP2's buffers)
    optimizer    T*8 for AdamW (two fp32 moments); T*2 for 8-bit; ~0 Adafactor
    DeepSpeed    bf16 keeps fp32 master weights + moments in the optimizer: 12*T, weights in 2, gradient sums in
                 4 (2 with trainer.grad_dtype=bfloat16: the ZeRO paper's 16*P); ZeRO-1 shards the optimizer (/N)
                 and its bf16 optimizer adds the micro-batch's bf16 gradients (2*T), ZeRO-2 also shards gradients,
                 ZeRO-3 also weights; offload moves the optimizer (and ZeRO-3 weights) to CPU
    FSDP2        weights, gradients and optimizer /N, plus the unsharded gradient sums (T*4) between the
                 micro-batches of a step when it accumulates (no reduce-scatter until the last)
    activations  per token per layer (7h + 2*kv + 4i) * a bytes for a Llama block with SDPA (a: 2 in bf16,
                 4 in fp32); with gradient checkpointing only the layer input h*a is kept, plus one layer;
                 with model.offload_checkpoints those inputs live in host memory (two in flight on the GPU)
    attention    0 for the varlen and flash kernels (memory linear in the row, counted in activations); for a
                 row of T tokens (B rows), with K layers keeping their activations (all, or the non-recomputed
                 ones + the one in recompute): sdpa B*T^2 for the boolean block-diagonal mask + K*B*T^2*a for
                 the float copy that SDPA makes of it and keeps for backward; eager a B*T^2*a additive mask,
                 K*B*H*T^2*(4 + a) for the fp32 softmax and its cast to the compute dtype (4 alone in fp32),
                 and B*H*T^2*(a + 4) for backward's gradients of one layer (H query heads per rank)
    logits       per token V*(2a + 8): the logits and their gradient, the log-softmax kept for backward and
                 its fp32 gradient, for the positions whose logits exist together: every position with
                 trainer.loss_head=full, at most trainer.loss_chunk supervised ones with the default supervised
                 head (model.head); with model.kernels=liger no logits (chunked), only V*h*a for the head's gradient

Under sequence parallelism (``parallel.sp_size=S``) a rank holds T/S tokens of each row, so its activations and
logits are those of max_seq_len/S tokens per row; ZeRO still shards over every rank (N is the world size).

Under tensor parallelism (``parallel.tp_size=K``, FSDP2) N counts the data-parallel ranks that shard (world / K, or
HSDP's group) and a rank holds 1/K of every weight, gradient and optimizer state on top; of a layer's activations
the 3h kept whole on every rank of the group (its input, the residual, the norms' outputs) stay, the rest is /K;
the logits are gathered whole (the head's output is all-gathered), and eager's scores have H/K heads.

These are estimates (allocator fragmentation, CUDA context and temporary buffers are not counted).

Activation checkpointing options: the estimate without it and with every 1st/2nd/4th/8th layer
recomputed, with the compute each adds (a recomputed forward is 1/3 of a full fine-tuning step's
FLOPs, 1/2 of a frozen-base one's); given ``plan.gpu_memory_gib`` (or a visible GPU) the least
recompute whose estimate fits in 85% of it is suggested (the estimate is good to ~10%).

Long rows: for each memory saver in turn (SAVERS: checkpointing, the tiled MLP, checkpoint offload), the longest
data.max_seq_len whose estimate fits, with the step time predicted at ASSUMED_MFU and, for offload, the pinned
host memory and the PCIe copies at HOST_BANDWIDTH.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import Config

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
    heads: int = 0  # query heads (attention's [T, T] terms)
    kv_heads: int = 0  # key/value heads (tensor parallelism must divide them; 0: as many as the query heads)


def memory_estimate(cfg: Config, shape: ModelShape, world_size: int, micro_batch: int,
                    fused_loss: bool = False, grad_accum: int = 1) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring). ``fused_loss``: Liger's fused linear
    cross-entropy (model.kernels=liger) never holds the logits. ``grad_accum``: micro-batches per step (FSDP2 holds
    unsharded gradients between them)."""
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
    g = 2 if cfg.trainer.precision == "bf16" and cfg.trainer.grad_dtype == "bfloat16" else 4  # summed, reduced in
    if par.strategy == "deepspeed":
        stage = par.zero_stage
        if ds_bf16:  # bf16 weights/grads of the trainable part in the engine, fp32 masters + moments in its optimizer
            weights, grads, opt = weights - t * 2, float(t * g), float(t * (4 + per_state))
            if stage == 1 and g == 4:  # ZeRO-1's bf16 optimizer: the micro-batch's bf16 grads + fp32 sums, whole
                grads = float(t * (2 + 4))
        opt = 0.0 if par.offload_optimizer else opt / n
        grads = grads / n if stage >= 2 else grads
        if stage == 3:
            weights = 0.0 if par.offload_params else weights / n
    elif par.strategy == "fsdp":
        weights, grads, opt = weights / n, grads / n, opt / n
        if grad_accum > 1:  # between micro-batches (no sync) FSDP2 keeps the unsharded gradients, in its reduce dtype
            grads += t * g
    tp = par.tp_size
    weights, grads, opt = weights / tp, grads / tp, opt / tp  # a tensor-parallel rank's slice of each
    tokens = micro_batch * cfg.data.max_seq_len / par.sp_size  # a sequence-parallel rank holds a slice of each row
    # model.tiled_mlp_shards: the MLP's intermediates exist for one chunk of the sequence at a time
    per_layer = (7 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate / max(1, cfg.model.tiled_mlp_shards)) * a
    per_layer = 3 * shape.hidden * a + (per_layer - 3 * shape.hidden * a) / tp  # TP: 3h whole, the rest split
    if cfg.model.gradient_checkpointing:  # recomputed layers keep their input; the others everything
        recomputed = recomputed_layers(shape.layers, cfg.model.checkpoint_every)
        kept = min(recomputed, 2) if cfg.model.offload_checkpoints else recomputed  # offloaded: two in flight
        acts = tokens * (kept * shape.hidden * a + (shape.layers - recomputed) * per_layer + per_layer)
    else:
        acts = tokens * shape.layers * per_layer
    head_grad = shape.vocab * shape.hidden * a if t == p else 0  # Liger's own buffer for the head's gradient
    at_once = tokens  # positions whose logits exist together
    if cfg.trainer.loss_head == "supervised" and cfg.trainer.loss_chunk:
        at_once = min(tokens, cfg.trainer.loss_chunk)  # model.head: one chunk of supervised positions at a time
    logits = head_grad if fused_loss else at_once * shape.vocab * (2 * a + 8)
    out = {"weights": weights, "gradients": grads, "optimizer": opt, "activations": float(acts),
           "attention": attention_bytes(cfg, shape, micro_batch, a), "logits": float(logits)}
    out["total"] = sum(out.values())
    return out


QUADRATIC = ("sdpa", "eager")  # attention kernels whose memory grows with the square of the row


def attention_bytes(cfg: Config, shape: ModelShape, rows: int, a: int) -> float:
    """Bytes of attention's [T, T] tensors (see the module docstring): masks of packed or padded rows under
    sdpa, and eager's scores. A sequence-parallel rank attends over whole rows with H/S heads after the
    all-to-all."""
    from .model.attention import configured_attention

    impl = configured_attention(cfg, cuda=True)  # the plan is for a GPU
    if impl not in QUADRATIC:
        return 0.0
    square = float(rows) * cfg.data.max_seq_len ** 2
    kept = shape.layers
    if cfg.model.gradient_checkpointing:
        kept = shape.layers - recomputed_layers(shape.layers, cfg.model.checkpoint_every) + 1
    if impl == "sdpa":
        return square * (1 + kept * a)
    heads = shape.heads / cfg.parallel.sp_size / cfg.parallel.tp_size
    return square * (a + heads * (kept * (4 + (a if a < 4 else 0)) + a + 4))


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

        def at(t: int) -> Config:
            return replace(c, data=replace(c.data, max_seq_len=t))

        def memory(t: int) -> float:
            return memory_estimate(at(t), shape, world_size, 1, fused_loss)["total"]

        def fits(t: int) -> bool:
            host = offloaded_bytes(at(t), shape, 1)
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
        host = offloaded_bytes(at(lo), shape, 1)
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


def checkpoint_bytes(cfg: Config, shape: ModelShape, world_size: int) -> list[float]:
    """Bytes of one checkpoint that each rank writes (index: rank). The trainable weights as fp32 masters (P-T
    frozen ones in their storage dtype w) and the optimizer state (AdamW: 8*T):

        ddp            rank 0: the whole model and optimizer (P-T)*w + T*4 + 8*T; the others nothing
        ZeRO-1/2       every rank its partition of fp32 masters + moments (4+8)*T/N; rank 0 also the module in the
                       engine's dtype (2 bytes under bf16)
        ZeRO-3         every rank its partition of the module, masters and moments
        FSDP2          every rank its shard of the model and the optimizer state (torch.distributed.checkpoint)
    """
    p, t, n = shape.params, shape.trainable, world_size
    frozen = p - t
    w = 2 if cfg.model.dtype == "bfloat16" else 4
    per_state = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "adafactor": 0.1}[cfg.optim.name]
    model, optim = frozen * w + t * 4.0, t * float(per_state)
    par = cfg.parallel
    if par.strategy == "ddp":
        return [model + optim] + [0.0] * (n - 1)
    if par.strategy == "fsdp":
        return [(model + optim) / n] * n
    engine = 2 if cfg.trainer.precision == "bf16" else w  # the engine's module copy
    shards = t * (4 + per_state) / n  # fp32 masters and moments
    if par.zero_stage == 3:
        return [shards + frozen * w / n] * n
    return [shards + p * engine] + [shards] * (n - 1)
