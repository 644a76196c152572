"""Trainer stage 2: the optimizer. AdamW without weight decay on biases, norms and other 1-D weights."""

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
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, cfg: OptimConfig) -> torch.optim.Optimizer:
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=on_cuda or None)
