"""Model stage (MoE): the router load-balancing term of the loss contract.

A mixture-of-experts model (Qwen3-MoE, Mixtral, ...) trains its routers with an auxiliary
load-balancing loss (Switch Transformer, eqs. 4-6): ``E * sum_e f_e * P_e``, with ``f_e`` the share of
top-k assignments that went to expert e and ``P_e`` its mean router probability, pooled over the
layers. transformers computes it over a whole forward's tokens and adds ``router_aux_loss_coef`` times
it to a loss distsft does not use (the trainer computes the cross-entropy itself), so without this the
routers would train without balancing.

distsft computes the term per *row* (a packed sequence, or one padded example; its real tokens only)
and adds, once per optimizer step, ``coef x`` the mean over every row of the step on every rank. A
row's term does not depend on which micro-batch carries it, so the step's loss and gradients are the
same however the global batch is split (micro-batch x accumulation x ranks), like the rest of the
contract; it is not divided by the supervised-token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .load import base_model


@dataclass(frozen=True)
class Router:
    coef: float
    num_experts: int
    top_k: int


def router(model) -> Router | None:
    """The load-balancing settings of an MoE model (None for a dense one, or a coefficient of 0)."""
    cfg = base_model(model).config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    coef = getattr(cfg, "router_aux_loss_coef", None)
    if not experts or not coef or not hasattr(cfg, "output_router_logits"):
        return None
    return Router(float(coef), int(experts), int(getattr(cfg, "num_experts_per_tok", 2)))


def row_balance_sum(router_logits: tuple[torch.Tensor, ...], real: torch.Tensor,
                    spec: Router) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the rows of each row's load-balancing term, [E] top-k assignments per expert over the real
    tokens of every layer: the expert load, detached). router_logits: per layer [B*T, E]; real: [B, T] bool,
    the row's real tokens (not padding)."""
    b, t = real.shape
    mask = real.reshape(b, t, 1).float()  # [B, T, 1]
    counts = torch.zeros(b, spec.num_experts, device=real.device)
    probs = torch.zeros(b, spec.num_experts, device=real.device)
    for layer in router_logits:
        p = F.softmax(layer.float().reshape(b, t, -1), dim=-1)  # [B, T, E]
        chosen = torch.zeros_like(p).scatter_(-1, p.topk(spec.top_k, dim=-1).indices, 1.0)  # top-k one-hot
        counts = counts + (chosen * mask).sum(1)  # [B, E]
        probs = probs + (p * mask).sum(1)
    tokens = mask.sum((1, 2)).clamp(min=1) * len(router_logits)  # [B]: real tokens x layers
    f, prob = counts / tokens[:, None], probs / tokens[:, None]
    return spec.num_experts * (f * prob).sum(), counts.sum(0).detach()
