"""Model pipeline (kernels): Liger's Triton kernels in place of transformers' layers, on request;
and regional ``torch.compile`` of the decoder layers (``model.compile``).

``model.kernels=liger`` (or ``auto`` on CUDA with liger-kernel installed, outside ZeRO-3/FSDP)
patches the loaded model (before adapters) with Liger's RMSNorm, RoPE and SwiGLU kernels and its
fused linear cross-entropy: in training, given labels, the model returns the
loss without ever building the [tokens, vocab] logits (for a 128k vocabulary that is the largest
tensor of a step). The loss keeps the contract: called with ``num_items_in_batch=1`` it is the sum of
token cross-entropies, and the trainer divides by the step's supervised tokens as always.
"""

from __future__ import annotations

import importlib.util
import logging

from ..compat import checked
from .load import base_model

log = logging.getLogger(__name__)
FUSED_LOSS = "_distsft_fused_loss"  # set on the model: its forward computes the loss from labels itself
# families whose forward scales the logits (Granite's logits_scaling): Liger 0.8 has no fused loss for them
NO_FUSED_LOSS = {"granite": "Granite scales its logits (logits_scaling), which Liger's fused cross-entropy cannot"}


def resolve_kernels(kernels: str, cuda: bool, sharded: bool, model_type: str | None = None,
                    sequence_parallel: bool = False) -> tuple[str, str]:
    """(kernels to use, why) for model.kernels=auto|torch|liger. ``sharded``: ZeRO-3 or FSDP."""
    if kernels != "auto":
        return kernels, "asked for"
    if sequence_parallel:
        return "torch", "sequence parallelism: each rank's slice goes through distsft's supervised-position head"
    if model_type in NO_FUSED_LOSS:
        return "torch", NO_FUSED_LOSS[model_type]
    if not cuda:
        return "torch", "no CUDA"
    if sharded:
        return "torch", "ZeRO-3/FSDP shard the output head that Liger's fused loss reads"
    if importlib.util.find_spec("liger_kernel") is None:
        return "torch", "liger-kernel is not installed (pip install 'distsft[liger]')"
    return "liger", "CUDA and liger-kernel installed"


def apply_kernels(model, kernels: str):
    if kernels == "torch":
        return model
    model_type = model.config.model_type
    if model_type in NO_FUSED_LOSS:
        raise RuntimeError(f"model.kernels=liger: {NO_FUSED_LOSS[model_type]}; set model.kernels=torch (or auto)")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError as e:
        raise RuntimeError(f"model.kernels=liger needs the liger-kernel package ({e}); pip install "
                           "'distsft[liger]' or set model.kernels=torch") from e
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise RuntimeError(f"model.kernels=liger: Liger has no kernels for model type {model_type!r}; "
                           "set model.kernels=torch")
    checked("model.kernels")
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=True, cross_entropy=False)
    setattr(model, FUSED_LOSS, True)
    log.info("kernels: liger (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) for %s", model_type)
    return model


def fused_loss(model) -> bool:
    """Whether the (possibly wrapped: DDP/DeepSpeed, PEFT) model computes its loss with Liger."""
    return bool(getattr(base_model(model), FUSED_LOSS, False))


def compile_layers(model) -> int:
    """``torch.compile`` every decoder layer in place (``nn.Module.compile``: parameter names, PEFT,
    checkpoints and export are unchanged). The layers share one class, so one compiled graph serves all
    of them; ``dynamic=True`` keeps packed rows of a new width from recompiling. Returns how many."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"model.compile: no decoder layers found in {type(base).__name__} (transformers names "
                           "none in _no_split_modules); set model.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("compile: %d %s layers (torch.compile, dynamic shapes; compiled on the first step)", len(layers),
             type(layers[0]).__name__)
    return len(layers)


def compile_stats() -> dict:
    """What torch.compile did in this process: graphs compiled (a number that grows with the steps means
    recompiles) and graph breaks (code it could not compile, run eagerly between graphs)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
