"""Trainer stage 2: the optimizer. No weight decay on biases, norms and other 1-D weights.

    adamw             torch.optim.AdamW (fused kernel on CUDA)
    adamw_8bit        bitsandbytes AdamW8bit: optimizer state in 8 bits (~75% less than fp32 Adam)
    paged_adamw_8bit  bitsandbytes PagedAdamW8bit: 8-bit state that pages to CPU memory under pressure
                      (on a machine without CUDA bitsandbytes falls back to the unpaged version)
    adafactor         transformers Adafactor with the trainer's LR schedule (no relative step)
"""

from __future__ import annotations

import torch

from ..config import OptimConfig


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-D tensors are biases and norm scales: decaying them only fights the normalisation
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # LoRA has no trainable 1-D weights


def build_optimizer(model, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adamw":
        on_cuda = next(model.parameters()).is_cuda
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=on_cuda or None)
    if cfg.name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)


def describe(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    inner = getattr(inner, "optimizer", inner)  # DeepSpeed's ZeRO wrapper
    return f"{type(inner).__module__.split('.')[0]}.{type(inner).__name__}"
