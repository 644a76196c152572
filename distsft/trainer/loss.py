"""Trainer: the loss contract.

The loss of an optimizer step is the sum of token cross-entropies over every supervised token
of every micro-batch on every rank, divided by the number of those tokens (N). Each micro-batch
therefore contributes ``sum_ce / N`` (N counted before the first forward, all-reduced over
ranks); DDP averages gradients over W ranks, so the backward loss is scaled by W. A mean of
per-micro-batch means would weight a short example's tokens more than a long one's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.tokenize import IGNORE


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies in fp32. logits [B, T, V], labels [B, T] aligned with inputs."""
    return target_ce_sum(logits[:, :-1, :], labels[:, 1:])  # position t predicts token t+1


def target_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropies in fp32 of logits [B, T, V] against targets [B, T] already shifted (the target of
    position t; a sequence-parallel slice's, see data.collate.sequence_shard)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
