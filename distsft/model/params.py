"""Model pipeline (parameters): the true shape of a parameter, whatever shards it.

Under DeepSpeed ZeRO-3 a parameter is a ``(0,)`` placeholder between gathers: its real shape and
size are ``ds_shape`` / ``ds_numel`` (and with weights loaded by ``from_pretrained`` it is a
placeholder from the first line of distsft's code on). Under FSDP2 a parameter is a DTensor whose
``shape`` is already the global one. Every place that reads a parameter's shape, rank or size (decay
groups, parameter counts, FLOPs, the plan) goes through these helpers, so none of them sees a
placeholder (issue: all ZeRO-3 weights landed in the no-decay group because a placeholder is 1-D).
"""

from __future__ import annotations

import torch


def true_shape(p: torch.Tensor) -> torch.Size:
    """The full shape of ``p``: ZeRO-3's ``ds_shape`` for a partitioned parameter, else ``p.shape``
    (a DTensor's shape is global)."""
    shape = getattr(p, "ds_shape", None)
    return torch.Size(shape) if shape is not None else p.shape


def true_ndim(p: torch.Tensor) -> int:
    return len(true_shape(p))


def true_numel(p: torch.Tensor) -> int:
    n = getattr(p, "ds_numel", None)
    return int(n) if n is not None else p.numel()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes, also under ZeRO-3)."""
    total = sum(true_numel(p) for p in model.parameters())
    trainable = sum(true_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total
