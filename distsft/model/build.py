"""Model pipeline: the ordered steps that make the model the trainer prepares, each in its own module.

    load (model.load: weights, dtype from model.precision, attention from model.attention, quantised by peft)
      -> tensor (weights split over the tp ranks) -> moe (ZeRO-3 leaf modules) -> sequence (Ulysses hand-off)
      -> kernels (Liger) -> peft (adapters, gradient checkpointing) -> fp8 -> tiling (tiled MLP) -> offload
      (checkpoints in host memory) -> precision (the master weights checked) -> head (supervised-position loss)
      -> compile

The order matters: Liger patches the base's layers before adapters wrap them; FP8 needs the adapters to know what is
frozen; the head is patched after everything that replaces modules; compile comes last, over what the others made.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ..checks import check_device_combinations
from ..config import Config, ConfigError
from . import sequence
from .attention import configured_attention
from .fp8 import apply_fp8
from .head import install as install_head
from .kernels import (
    apply_kernels,
    compile_layers,
    fused_loss,
    resolve_kernels,
)
from .load import load_model, whole_model
from .moe import mark_z3_leaf_modules
from .offload import apply_checkpoint_offload
from .params import count_parameters
from .peft import apply_peft, quantization_config
from .precision import check_master_weights, load_dtype
from .tensor import apply_tensor_parallel
from .tiling import apply_tiled_mlp

log = logging.getLogger("distsft")


def build_model(cfg: Config, acc, micro_batch: int | None = None):
    """(model, trainable, total parameters): load (quantised) -> kernels -> adapters -> gradient checkpointing
    -> compiled layers. ``micro_batch``: the rows of a micro-batch (Ulysses' attention under FSDP2 is built for it)."""
    cuda = acc.device.type == "cuda"
    check_device_combinations(cfg, cuda)
    model_cfg = replace(cfg.model, dtype=load_dtype(cfg))  # trainable weights are fp32 masters
    model_cfg = replace(model_cfg, attn_implementation=configured_attention(cfg, cuda))
    if cfg.parallel.sequence_parallel:  # the attention behind DeepSpeed's all-to-all gets no mask
        model_cfg = replace(model_cfg, attn_implementation=sequence.attention(model_cfg.attn_implementation))
    with whole_model(acc, cfg.model.init == "config"):
        model = load_model(model_cfg, cfg.trainer.seed, cuda=cuda, device=acc.device.index if cuda else "cpu",
                           quantization=quantization_config(cfg.peft, cfg.parallel.zero3))
    if cfg.parallel.tensor_parallel:  # the weights split over the mesh's tp ranks, before anything wraps a layer
        apply_tensor_parallel(model, acc, cfg.parallel.tp_size)
    if cfg.parallel.zero3:  # before accelerate.prepare: DeepSpeed reads the flags when it wraps the model
        mark_z3_leaf_modules(model)
    if cfg.parallel.sequence_parallel and cfg.parallel.strategy == "fsdp":  # Ulysses on FSDP2's mesh
        sequence.around_attention(acc, model, cfg.parallel.sp_size, cfg.parallel.tp_size,
                                  micro_batch or cfg.trainer.micro_batch_size)
    elif cfg.parallel.sequence_parallel:  # Ulysses inside DeepSpeed, registered by Accelerate at prepare
        sequence.hand_to_accelerate(acc, model, cfg.parallel.sp_size)
    if cfg.peft.method != "none" and cfg.model.init == "config":
        log.warning("peft=%s on a randomly initialised base (model.init=config): adapters adapt what a pretrained "
                    "model knows, a random one knows nothing and the loss barely falls; for the embedded model use "
                    "model=tiny_base (pretrained)", cfg.peft.method)
    kernels, why = resolve_kernels(cfg.model.kernels, cuda, cfg.parallel.shards_parameters, model.config.model_type,
                                   cfg.parallel.sequence_parallel)
    log.info("kernels: %s (model.kernels=%s: %s)", kernels, cfg.model.kernels, why)
    model = apply_kernels(model, kernels)  # before adapters: Liger patches the base's layers
    model = apply_peft(model, cfg.peft, cfg.model.gradient_checkpointing, cfg.model.checkpoint_every,
                       bf16_autocast=cfg.trainer.precision == "bf16", zero3=cfg.parallel.zero3)
    if cfg.model.fp8:  # after the adapters: they mark what is frozen
        frozen, trainable = apply_fp8(model)
        log.info("fp8: %d frozen and %d trainable linear layers of the decoder run FP8 matmuls (model.fp8; %s)",
                 frozen, trainable, "FP8 tensor cores" if cuda else "emulated on CPU: slow, for checking")
    if cfg.model.tiled_mlp_shards:
        if acc.num_processes > 1 and cfg.parallel.strategy != "deepspeed":
            raise ConfigError(f"model.tiled_mlp_shards with parallel={cfg.parallel.strategy} on {acc.num_processes} "
                              "processes: its chunks accumulate gradients inside one backward, which only DeepSpeed "
                              "is told about; use parallel=zero1|zero2|zero3, or model.tiled_mlp_shards=0")
        log.info("tiled MLP: %d decoder MLPs in %d chunks of the sequence (model.tiled_mlp_shards)",
                 apply_tiled_mlp(model, cfg.model.tiled_mlp_shards), cfg.model.tiled_mlp_shards)
    if cfg.model.offload_checkpoints:
        log.info("checkpoint offload: the inputs of %d recomputed decoder layers are kept in host memory "
                 "(model.offload_checkpoints)", apply_checkpoint_offload(model)[0])
    check_master_weights(model, cfg.parallel.strategy == "deepspeed", cfg.trainer.precision)
    if cfg.trainer.loss_head == "supervised" and not fused_loss(model):  # Liger's fused loss builds no logits
        log.info("loss head: %s (trainer.loss_chunk=%d)", install_head(model, cfg.trainer.loss_chunk),
                 cfg.trainer.loss_chunk)
    if cfg.model.compile:  # last: the compiled layers hold the kernels and adapters
        compile_layers(model)
    return (model, *count_parameters(model))
