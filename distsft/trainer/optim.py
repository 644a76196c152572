"""Trainer: the optimizer. No weight decay on biases, norms and other 1-D weights.

    adamw             torch.optim.AdamW, fused kernel (CUDA and CPU): it can also skip a non-finite
                      update on the device (``skip_flag``), so the step needs no host sync; under
                      trainer.precision=bf16_pure torchao's AdamW instead, which rounds each bf16 update
                      stochastically (a compiled kernel per parameter shape: the first step compiles)
    adamw_8bit        bitsandbytes AdamW8bit: optimizer state in 8 bits (~75% less than fp32 Adam)
    paged_adamw_8bit  bitsandbytes PagedAdamW8bit: 8-bit state that pages to CPU memory under pressure
                      (on a machine without CUDA bitsandbytes falls back to the unpaged version)
    adafactor         transformers Adafactor with the trainer's LR schedule (no relative step)
"""

from __future__ import annotations

import torch

from ..config import OptimConfig
from ..model.params import true_ndim


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-D tensors are biases and norm scales: decaying them only fights the normalisation. The true
        # rank: under ZeRO-3 every weight is a 1-D placeholder here (shard-on-load)
        (decay if true_ndim(p) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # LoRA has no trainable 1-D weights


def build_optimizer(model, cfg: OptimConfig, stochastic_round: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adamw" and stochastic_round:
        try:
            from torchao.optim import _AdamW
        except ImportError as e:
            raise RuntimeError(f"trainer.precision=bf16_pure needs torchao ({e}): pip install 'distsft[bf16_pure]', or "
                               "use trainer.precision=bf16") from e
        return _AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, bf16_stochastic_round=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=True)
    if cfg.name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)


def skip_flag(optimizer) -> torch.Tensor | None:
    """A 0-d float tensor on the parameters' device: set to 1 before ``optimizer.step()``, torch's fused
    AdamW leaves parameters, moments and step count untouched (its ``found_inf`` input, as under a
    GradScaler). None where the optimizer cannot skip on the device: then the step is decided on the host.
    Not under DeepSpeed (its engine steps) or FSDP2 (DTensor parameters)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    if not hasattr(inner, "_distsft_skip"):
        params = [p for g in inner.param_groups for p in g["params"]]
        fused = isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and inner.defaults.get("fused")
        plain = all(type(p.data) is torch.Tensor for p in params)  # noqa: E721 (a DTensor is a subclass)
        inner._distsft_skip = None
        if fused and plain and params:
            inner._distsft_skip = inner.found_inf = torch.zeros((), dtype=torch.float32, device=params[0].device)
    return inner._distsft_skip


def describe(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    inner = getattr(inner, "optimizer", inner)  # DeepSpeed's ZeRO wrapper
    return f"{type(inner).__module__.split('.')[0]}.{type(inner).__name__}"
