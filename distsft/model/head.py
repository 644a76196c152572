"""Model stage 1c (head): the output head computes the loss of the supervised positions only, in chunks.

A step's loss needs the logits of the supervised positions alone: prompts (typically 30-60% of SFT
tokens) and padding need no head matmul and no ``[tokens x vocab]`` logits. The trainer knows those
positions on the host, from the labels, before the step (the collate writes them into the batch):

    labels (packed row, T=6)   [-100  -100  l2  l3  -100  l5]     position t predicts token t+1
    sup_index                  [1, 2, 4]                          flat b*T + t with labels[b, t+1] supervised
    sup_targets                [l2, l3, l5]

During the training forward the head (patched on the instance, so ZeRO-3's and FSDP's hooks still
gather its weight around the call, and a PEFT adapter on the head still applies) takes the hidden
states at ``sup_index`` and returns the fp32 cross-entropy *sum* of those positions, a 0-d tensor,
as the model's ``logits``. The head and the cross-entropy run ``chunk`` positions at a time; when
there are more than ``chunk``, each chunk is recomputed in backward (activation checkpointing), so
only one chunk's logits exist at any time, under every strategy. The chunks call the head's own
``forward`` (no module hooks, so no collective whose count would depend on the rank's data); a head
with sub-modules (a LoRA adapter on the head) runs all its positions in one call instead. Outside a training forward (eval
without positions, generation) the head is the model's own.

Models that change the logits after the head (Gemma's final soft-capping, Granite's logit scaling,
Cohere's logit scale) keep the plain path: full logits, cross-entropy in the trainer.
"""

from __future__ import annotations

import functools
import logging
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .load import base_model

log = logging.getLogger(__name__)
SELECT = "_distsft_select"  # on the head: (sup_index, sup_targets) of the forward in progress
PATCHED = "_distsft_head_chunk"  # on the head: the chunk size, once patched
# config attributes of models whose forward transforms the head's output (then the plain path)
AFTER_HEAD = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier_scale")


def after_head(config) -> str | None:
    """The config attribute that transforms the logits after the head, if any."""
    for name in AFTER_HEAD:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, False):
            return f"{name}={value}"
    return None


def install(model, chunk: int) -> str:
    """Patch the output head for the supervised-position loss; returns what the log says."""
    base = base_model(model)
    head = base.get_output_embeddings()
    why = after_head(base.config)
    if head is None or why:
        return f"plain (full logits; {why or 'no output head found'})"
    head.forward = types.MethodType(_forward, head)  # an instance attribute: the class's hooks still run
    if chunk and any(True for _ in head.children()):
        # a wrapped head (a PEFT adapter on it) calls its sub-modules, and under ZeRO-3 every such call
        # gathers parameters collectively: a chunk count that differs between ranks would hang them
        log.info("loss head: %s has sub-modules (an adapter): supervised positions in one chunk", type(head).__name__)
        chunk = 0
    setattr(head, PATCHED, chunk)
    return f"supervised positions only, {chunk} at a time" if chunk else "supervised positions only, in one chunk"


def installed(model) -> bool:
    head = base_model(model).get_output_embeddings()
    return head is not None and hasattr(head, PATCHED)


@contextmanager
def supervised(model, index: torch.Tensor, targets: torch.Tensor):
    """Within: the model's ``logits`` is the cross-entropy sum of these positions (a 0-d tensor)."""
    head = base_model(model).get_output_embeddings()
    setattr(head, SELECT, (index, targets))
    try:
        yield
    finally:
        setattr(head, SELECT, None)


def _forward(head, hidden: torch.Tensor) -> torch.Tensor:
    original = functools.partial(type(head).forward, head)  # the head's own forward (a PEFT adapter included)
    select = getattr(head, SELECT, None)
    if select is None:
        return original(hidden)
    index, targets = select
    h = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)  # [B, T, H] -> [n, H]
    return chunked_ce_sum(original, h, targets, getattr(head, PATCHED))


def chunked_ce_sum(head_fn, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum over rows of cross_entropy(head_fn(h), targets) in fp32, ``chunk`` rows at a time (all at once
    when 0 or when they fit). With several chunks each is recomputed in backward: one chunk's logits at a
    time. ``n`` is a host number (the index length), so the loop adds no device sync."""
    n = h.size(0)
    if not chunk or n <= chunk:
        return _ce_sum(head_fn, h, targets)  # one chunk (possibly empty: a 0 that still reaches the head)
    total = None
    for s in range(0, n, chunk):
        part = checkpoint(_ce_sum, head_fn, h[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total


def _ce_sum(head_fn, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_fn(h).float(), targets, reduction="sum")
