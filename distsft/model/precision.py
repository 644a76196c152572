"""Model pipeline (precision): one precision contract under every strategy.

    trainer.precision=fp32   fp32 compute, fp32 trainable weights and optimizer state
    trainer.precision=bf16   bf16 compute (autocast; DeepSpeed: its bf16 engine), gradients accumulated over
                             the micro-batches and reduced across ranks in fp32, fp32 master weights and fp32
                             optimizer state (trainer.grad_dtype=bfloat16 trades the gradients' precision for
                             half their traffic and buffers)
    trainer.precision=bf16_pure  bf16 weights, bf16 AdamW moments, and every update stochastically rounded
                             to bf16 (torchao's AdamW): 8 bytes per parameter instead of 16; small updates
                             survive in expectation rather than exactly (ddp full fine-tuning only)

whatever ``model.dtype`` the checkpoint is stored in. ``model.dtype`` is the storage dtype: frozen
weights (a PEFT base) stay in it, and the full fine-tuned export is written in it. Trainable weights
never train in bf16: near a weight of 0.02, half a bf16 ULP (6e-5) is larger than an AdamW step at
lr 1e-5, so most small updates would round away (and the numerics would depend on the strategy, since
DeepSpeed and FSDP keep fp32 masters on their own).

How each strategy meets it:
    ddp          full fine-tuning loads the weights in fp32; bf16 is autocast over fp32 weights, whose
                 gradients are fp32 (accumulated in .grad, all-reduced in fp32)
    fsdp         as ddp, with FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): gradients
                 accumulated without sync and reduce-scattered in fp32 (Accelerate's default is bf16 for both)
    deepspeed    the weights load in fp32 (ZeRO-3: straight into shards of the engine's dtype); under
                 bf16 the engine computes in bf16 and its optimizer keeps fp32 masters and moments;
                 data_types.grad_accum_dtype and communication_data_type are fp32 (DeepSpeed's default is
                 the model dtype, bf16: each micro-batch's gradients would be summed and reduced in bf16)
    PEFT         the base is frozen in model.dtype; PEFT keeps the adapters in fp32
"""

from __future__ import annotations

import torch

from ..config import Config, ConfigError

# what trainer.grad_dtype=bfloat16 rounds on each strategy
BF16_GRADS = {"ddp": "reduced (accumulated in fp32)", "deepspeed": "accumulated and reduced",
              "fsdp": "accumulated and reduced"}


def load_dtype(cfg: Config) -> str:
    """The dtype to load the model in: fp32 when every weight trains (they are the master weights), bf16
    under bf16_pure."""
    if cfg.trainer.precision == "bf16_pure":
        return "bfloat16"
    return "float32" if cfg.peft.method == "none" else cfg.model.dtype


def half_compute(cfg: Config) -> bool:
    """Whether matmuls run in bf16: autocast, or a frozen bf16 base under PEFT."""
    return cfg.trainer.precision in ("bf16", "bf16_pure") or (
        cfg.peft.method != "none" and cfg.model.dtype == "bfloat16")


def describe(cfg: Config) -> str:
    if cfg.trainer.precision == "bf16_pure":
        return ("bf16 compute, bf16 weights and AdamW state, updates stochastically rounded (torchao); no fp32 "
                f"masters; exported in {cfg.model.dtype}")
    compute = "bf16 compute (autocast)" if cfg.trainer.precision == "bf16" else "fp32 compute"
    if cfg.parallel.strategy == "deepspeed" and cfg.trainer.precision == "bf16":
        compute = "bf16 compute (DeepSpeed's bf16 engine)"
    grads = "fp32 gradients"
    if cfg.trainer.precision == "bf16":
        grads = ("gradients accumulated and reduced in fp32" if cfg.trainer.grad_dtype == "float32" else
                 f"gradients {BF16_GRADS[cfg.parallel.strategy]} in bf16 (trainer.grad_dtype=bfloat16)")
    compute = f"{compute}, {grads}"
    frozen = f"; frozen base in {cfg.model.dtype}" if cfg.peft.method != "none" else \
        f"; exported in {cfg.model.dtype}"
    if cfg.model.fp8:
        frozen += "; the decoder's matmuls in FP8 (e4m3 inputs and weights, e5m2 gradients: model.fp8)"
    return f"{compute}, fp32 master weights and optimizer state{frozen}"


def check_master_weights(model, deepspeed: bool, precision: str = "fp32") -> None:
    """Every trainable parameter is fp32 (DeepSpeed: its optimizer holds the fp32 masters instead), or bf16
    under bf16_pure."""
    if deepspeed:
        return
    want = torch.bfloat16 if precision == "bf16_pure" else torch.float32
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != want})
    if wrong:
        raise ConfigError(f"trainable weights in {', '.join(wrong)}: trainer.precision={precision} trains them in "
                          f"{want} (a model transformation changed their dtype)")
