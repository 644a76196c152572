"""Model pipeline (checkpoint offload): what activation checkpointing keeps lives in host memory.

With gradient checkpointing a recomputed decoder layer keeps only its input for backward: one
``[B, T, h]`` tensor per layer, ``layers x T x h x a`` bytes, the largest term left once the MLP is
tiled and the loss chunked (8B, 128k tokens, bf16: 32 x 1 GiB). ALST's recipe moves those inputs to
pinned host memory as they are saved and brings each back when backward reaches its layer::

    forward : layer_i(x_i): checkpoint saves x_i  -> copied to host (pinned), the GPU copy is freed
    backward: layer_i reached -> x_i copied back -> recompute layer_i -> its gradients -> x_i freed again

so the GPU holds about one layer's input instead of all of them. The copies go on the compute stream
(the allocator cannot reuse a freed input before its copy has read it) and cost two PCIe transfers of
``T x h x a`` bytes per recomputed layer and step; ``distsft.plan`` counts them. Numerics are unchanged.

Where it hooks in: transformers calls ``layer._gradient_checkpointing_func(forward, *args)`` for every
recomputed layer (``GradientCheckpointingLayer``); torch's non-reentrant checkpoint saves ``args`` (the
hidden states) through the saved-tensor hooks active around that call, then installs its own innermost
hook for the layer's body. Wrapping that one call in :class:`HostOffload` therefore moves exactly the
layer inputs, and nothing saved inside the layer or elsewhere in the model.
"""

from __future__ import annotations

import functools

import torch

from ..compat import checked
from ..config import ConfigError

PATCHED = "_distsft_offloaded"


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors go to pinned host memory and come back to their device when backward unpacks them.
    Parameters stay where they are (they live on the device anyway). A CPU tensor has nowhere to go: it is
    kept as is and only counted. ``stats["bytes"]`` adds up what passed through, per the running process."""

    def __init__(self, stats: dict):
        def pack(t: torch.Tensor):
            if isinstance(t, torch.nn.Parameter):
                return t
            stats["bytes"] += t.numel() * t.element_size()
            stats["tensors"] += 1
            if t.device.type == "cpu":
                return t
            # non_blocking to the CPU lands in pinned memory; ordered on this stream before any reuse of t's memory
            return t.device, t.to("cpu", non_blocking=True)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def apply_checkpoint_offload(model) -> tuple[int, dict]:
    """Wrap the checkpoint call of every recomputed decoder layer in :class:`HostOffload`. Returns the number
    of layers wrapped and the byte counter they share (``{"bytes", "tensors"}`` since the last reset)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    stats = {"bytes": 0, "tensors": 0}
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ConfigError("model.offload_checkpoints=true: no decoder layer is recomputed (transformers' "
                          "GradientCheckpointingLayer with gradient_checkpointing on), so there is nothing to offload; "
                          "set model.gradient_checkpointing=true, or drop model.offload_checkpoints")
    checked("model.offload")
    for layer in layers:
        inner = layer._gradient_checkpointing_func

        @functools.wraps(inner)
        def offloaded(*args, _inner=inner, **kwargs):
            with HostOffload(stats):
                return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = offloaded
        setattr(layer, PATCHED, True)
    return len(layers), stats
