"""Trainer: the learning-rate schedule (linear warmup, then cosine / linear / constant).

With peak lr ``eta_max``, ``eta_min = min_lr_ratio * eta_max``, W warmup steps and T steps in all,
at optimizer step t (the LR used by the (t+1)-th update):

    t <  W : eta_max * (t + 1) / (W + 1)          (never a zero-LR first step)
    t >= W : u = (t - W) / max(1, T - W)
             cosine   : eta_min + (eta_max - eta_min) * (1 + cos(pi * u)) / 2
             linear   : eta_min + (eta_max - eta_min) * (1 - u)
             constant : eta_max
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from ..config import ScheduleConfig


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    w = warmup_steps(cfg, total_steps)
    if step < w:
        return (step + 1) / (w + 1)
    if cfg.name == "constant":
        return 1.0
    u = min(1.0, (step - w) / max(1, total_steps - w))
    lo = cfg.min_lr_ratio
    if cfg.name == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * u))
    return lo + (1 - lo) * (1 - u)


def build_scheduler(optimizer, cfg: ScheduleConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
