"""Model pipeline (head): the output head computes the loss of the supervised positions only, in chunks.

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
with sub-modules (a LoRA adapter on the head) runs all its positions in one call instead. Outside a
training forward (eval without positions, generation) the head is the model's own.

The head is kept only where the model is seen to return the head's output unchanged as its ``logits``;
anything else trains on the plain path (full logits, cross-entropy in the trainer) and the log says why:

- at ``install``, a fast pre-check: a config attribute that transforms the logits after the head (Gemma's
  final soft-capping, Granite's logit scaling, Cohere's logit scale, Falcon-H1's ``lm_head_multiplier``), in
  the config or a sub-config (a multimodal model's ``text_config``), keeps the plain path from the start;
- in every supervised forward, the proof: the patched head records the tensor it returned (held, so its memory
  cannot be reused by a transformed copy) and its version counter; ``confirm`` (called by the trainer on the
  model's output) accepts the model's ``logits`` only if they are that tensor, or a view of the same memory and
  layout (ZeRO-3's module hooks return ``detach()`` of each output), not changed in place since. Host metadata
  only (object, pointer, shape, strides, version): no device sync. A model that scales, soft-caps, slices or
  recomputes the logits after its head fails it whatever its config says: the head is uninstalled for good,
  a warning names the model class, and the trainer reruns that micro-batch on the plain path.
"""

from __future__ import annotations

import functools
import logging
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..compat import checked
from .load import base_model

log = logging.getLogger(__name__)
SELECT = "_distsft_select"  # on the head: (sup_index, sup_targets, Returned) of the forward in progress
PATCHED = "_distsft_head_chunk"  # on the head: the chunk size, once patched
OWN = "_distsft_own_forward"  # on the head: a forward the instance had before (tensor parallelism's), kept
# config attributes of models whose forward transforms the head's output (then the plain path); a pre-check only:
# the proof is ``confirm`` on every supervised forward
AFTER_HEAD = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier_scale",
              "lm_head_multiplier")


def after_head(config) -> str | None:
    """The config attribute that transforms the logits after the head, if any, in the config or a sub-config
    (``text_config.final_logit_softcapping=30.0``)."""
    for prefix, cfg in _configs(config, "", set()):
        for name in AFTER_HEAD:
            value = getattr(cfg, name, None)
            if value not in (None, 1, 1.0, False):
                return f"{prefix}{name}={value}"
    return None


def _configs(config, prefix: str, seen: set):
    """The config and its sub-configs (``text_config``, ...), each with its attribute path."""
    from transformers import PretrainedConfig

    seen.add(id(config))
    yield prefix, config
    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig) and id(value) not in seen:
            yield from _configs(value, f"{prefix}{key}.", seen)


def install(model, chunk: int) -> str:
    """Patch the output head for the supervised-position loss; returns what the log says."""
    base = base_model(model)
    head = base.get_output_embeddings()
    why = after_head(base.config)
    if head is None or why:
        return f"plain (full logits; {why or 'no output head found'})"
    checked("model.head")
    if "forward" in head.__dict__:  # a forward already set on the instance (tensor parallelism's): it stays the head's
        setattr(head, OWN, head.__dict__["forward"])
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


def uninstall(model, why: str) -> None:
    """Give the head its own forward back, for good, and say why (once: the head is no longer installed)."""
    base = base_model(model)
    head = base.get_output_embeddings()
    own = head.__dict__.pop(OWN, None)
    for name in ("forward", PATCHED, SELECT):  # instance attributes: the class's forward is the head's own again
        head.__dict__.pop(name, None)
    if own is not None:
        head.forward = own
    dist = torch.distributed
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0  # rank 0 speaks
    log.log(logging.WARNING if rank0 else logging.INFO,
            "loss head: %s %s; the loss uses the full logits (plain path) from now on", type(base).__name__, why)


class Returned:
    """What the patched head returned in one supervised forward: the tensor, held until checked (while it lives
    its memory cannot be reused by a transformed copy), and its version counter (an in-place change bumps it)."""

    __slots__ = ("tensor", "version")

    def __init__(self):
        self.tensor, self.version = None, None


@contextmanager
def supervised(model, index: torch.Tensor, targets: torch.Tensor):
    """Within: the model's ``logits`` is the cross-entropy sum of these positions (a 0-d tensor), if the model
    returns its head's output unchanged: pass what it yields, with the logits, to ``confirm``."""
    head = base_model(model).get_output_embeddings()
    returned = Returned()
    setattr(head, SELECT, (index, targets, returned))
    try:
        yield returned
    finally:
        setattr(head, SELECT, None)


def confirm(model, returned: Returned, logits) -> bool:
    """Whether the model's ``logits`` are the CE sum its head returned in this supervised forward. If not, the
    model changes the logits after its head: the head is uninstalled (``uninstall`` says why) and the caller
    computes the loss on the plain path. Structural, from host metadata: the same verdict on every rank."""
    ours, returned.tensor = returned.tensor, None  # the forward's graph lives no longer than the caller's logits
    if ours is None:
        why = "does not return its output head's result as the logits"
    elif not isinstance(logits, torch.Tensor) or not _same_memory(ours, logits):
        why = "changes the logits after its output head (scaled, soft-capped, sliced or recomputed)"
    elif _version(logits) != returned.version:
        why = "changes the logits after its output head (in place)"
    else:
        return True
    uninstall(model, why)
    return False


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor, or a view of the same memory with the same layout (DeepSpeed ZeRO-3's module hooks
    replace every module output by ``output.detach()``: another object, the same storage and version counter)."""
    return a is b or (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
                      and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version  # inference tensors track no version (nor in-place changes)


def _forward(head, hidden: torch.Tensor) -> torch.Tensor:
    # the head's own forward (a PEFT adapter included; tensor parallelism's, which gathers the logits, when set)
    original = getattr(head, OWN, None) or functools.partial(type(head).forward, head)
    select = getattr(head, SELECT, None)
    if select is None:
        return original(hidden)
    index, targets, returned = select
    h = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)  # [B, T, H] -> [n, H]
    total = chunked_ce_sum(original, h, targets, getattr(head, PATCHED))
    returned.tensor, returned.version = total, _version(total)  # for confirm: the model must return this, as is
    return total


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
