"""Model pipeline (tiled MLP): the decoder MLPs run on chunks of the sequence, for long rows.

A dense decoder MLP holds ``[tokens x intermediate]`` activations for backward (gate, up, their
product: about 4 x intermediate values per token, against 7 x hidden for the rest of a Llama block),
the largest share of a long row's activation memory. DeepSpeed's ``TiledMLP`` (the ALST recipe) keeps
only the MLP's input: forward runs the chunks without autograd, backward recomputes one chunk at a
time and back-propagates it, so one chunk's intermediates exist at any moment::

    x [B, T, h] -> chunks x_1..x_S [B, T/S, h] -> mlp(x_i) each (no graph) -> cat -> [B, T, h]
    backward: for each i: recompute mlp(x_i) with a graph, backward the chunk's gradient

The cost is one more MLP forward per step (three with activation checkpointing). The chunk count is
fixed (``model.tiled_mlp_shards``), so every rank makes the same calls (ZeRO-3 gathers weights
collectively per call). The weights' gradients accumulate over the chunks inside one backward, which
DeepSpeed is told (``ds_grad_is_ready``) and DDP/FSDP hooks are not: several processes need DeepSpeed.
"""

from __future__ import annotations

import types

from ..compat import checked
from ..config import ConfigError
from .load import base_model

PATCHED = "_distsft_tiled_mlp"


def decoder_mlps(model) -> list:
    """The MLP module of every decoder layer (``layer.mlp``)."""
    layers = getattr(getattr(base_model(model), "model", None), "layers", None)
    if layers is None:
        raise ConfigError("model.tiled_mlp_shards: no decoder layers found (model.model.layers) in "
                          f"{type(base_model(model)).__name__}")
    return [layer.mlp for layer in layers if hasattr(layer, "mlp")]


def apply_tiled_mlp(model, shards: int) -> int:
    """Patch every decoder MLP (on the instance) to run in ``shards`` chunks; returns how many were patched."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    checked("model.tiling")
    mlps = decoder_mlps(model)
    for mlp in mlps:
        if hasattr(mlp, "experts") or hasattr(mlp, "gate") and not hasattr(mlp, "gate_proj"):
            raise ConfigError(f"model.tiled_mlp_shards={shards}: {type(mlp).__name__} is a mixture-of-experts "
                              "layer (tokens are already routed in groups); set model.tiled_mlp_shards=0")
        own = type(mlp).forward  # the class's forward; the instance attribute below replaces it

        def forward(self, x, _own=own):
            trainable = [p for p in self.parameters() if p.requires_grad]  # LoRA adapters too
            return TiledMLP.apply(_own, self, x, shards, trainable)

        mlp.forward = types.MethodType(forward, mlp)
        setattr(mlp, PATCHED, shards)
    return len(mlps)
