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

Two more things an MoE model needs, both keyed on its sparse blocks (``moe_blocks``: transformers 5 fuses a
layer's experts into one module of 3-D weights, named ``experts``, beside the router):

- ZeRO-3 leaf modules (``mark_z3_leaf_modules``): DeepSpeed gathers a leaf module's parameters all at once when
  the module is entered instead of hooking each submodule; the experts a token is routed to change from step
  to step, which defeats ZeRO-3's prefetch trace, so each block (router and experts) is fetched whole.
- Active parameters (``active_parameters``): a token passes through top_k of the num_experts experts, so its
  FLOPs count the non-expert weights and top_k/num_experts of the expert weights, not all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .load import base_model
from .params import true_numel

log = logging.getLogger(__name__)


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


def moe_blocks(model) -> list[torch.nn.Module]:
    """The sparse mixture-of-experts blocks of ``model`` (under DDP/DeepSpeed/PEFT wrappers too): every module
    with a child named ``experts`` (Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock, ...: the router and the
    fused experts of one layer). A dense model has none."""
    return [m for m in base_model(model).modules() if isinstance(m._modules.get("experts"), torch.nn.Module)]


def mark_z3_leaf_modules(model) -> list[str]:
    """Mark the classes of ``model``'s MoE blocks as ZeRO-3 leaf modules (``deepspeed.utils.set_z3_leaf_modules``),
    before ``accelerate.prepare`` (DeepSpeed reads the flags when it wraps the model): each block's parameters are
    gathered together on entry, not per submodule in an order that changes with the routing. Returns the class
    names marked ([] for a dense model) and logs them. Recent DeepSpeed (0.19) also marks the Mixtral, Qwen2-MoE
    and Qwen3-MoE blocks on its own, by import path (zero_optimization.leaf_module); this marks whatever MoE
    family is loaded, on any DeepSpeed version, and says so."""
    classes = sorted({type(m) for m in moe_blocks(model)}, key=lambda c: c.__qualname__)
    if not classes:
        log.info("ZeRO-3 leaf modules: none (no mixture-of-experts blocks)")
        return []
    from deepspeed.utils import set_z3_leaf_modules

    marked = set_z3_leaf_modules(model, classes)
    names = [c.__qualname__ for c in classes]
    log.info("ZeRO-3 leaf modules: %s (%d blocks, each gathered whole: router and experts at once)",
             ", ".join(names), len(marked))
    return names


def active_parameters(model) -> int:
    """Parameters one token passes through (full sizes, also for ZeRO-3 placeholders): every parameter but the
    routed experts, of which a token meets top_k of num_experts; for a dense model, all of them. Adapters on the
    experts (PEFT's per-expert LoRA) are counted the same way as the weights they adapt; shared experts
    (Qwen2-MoE's shared_expert) are not routed and count whole."""
    total = sum(true_numel(p) for p in model.parameters())
    blocks = moe_blocks(model)
    if not blocks:
        return total
    cfg = base_model(model).config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) \
        or getattr(cfg, "n_routed_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not experts or not top_k:  # a metric must not stop a run: count every expert, and say so
        log.warning("%s has mixture-of-experts blocks but its config names no num_experts (num_local_experts, "
                    "n_routed_experts) or num_experts_per_tok: FLOPs count every expert as active (MFU overstated)",
                    type(base_model(model)).__name__)
        return total
    routed = sum(true_numel(p) for b in blocks for p in b._modules["experts"].parameters())
    return total - routed + routed * int(top_k) // int(experts)
