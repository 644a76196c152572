"""Model pipeline (tensor parallelism): every weight matrix of the decoder split across ``parallel.tp_size`` ranks.

The loaded model is whole on every rank (the same weights: the same seed or the same files). transformers' own TP
plan for the model type (``base_model_tp_plan``: q/k/v and the MLP's gate/up column-wise, o and down row-wise, the
embedding by vocabulary rows, the output head column-wise with its logits gathered) is applied on the ``tp``
dimension of the device mesh the accelerator holds (trainer.accelerator.fsdp_parallelism): each rank keeps its
slice of every split weight as a DTensor, and the forward passes all-reduce after each row-wise layer::

    x [B, T, h] (whole on every rank of the tp group)
      (the embedding: this rank's V/tp rows looked up, the partial vectors all-reduced)
      -> q,k,v: this rank's H/tp heads -> attention -> o_proj (row-wise): partial [B, T, h] -> all-reduce
      -> gate,up: this rank's I/tp columns -> down_proj (row-wise): partial -> all-reduce
      -> lm_head (column-wise): V/tp logits -> all-gather -> [B, T, V] on every rank

Norms stay whole (Accelerate makes them replicated DTensors at ``prepare`` so that FSDP2 shards every
parameter over the same 2-D mesh). The ranks of a tp group read the same rows (data.loader), so the loss is the
same on each; the loss contract counts their tokens once (trainer.step).
"""

from __future__ import annotations

from ..compat import checked
from ..config import ConfigError


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_splits(model, tp: int) -> None:
    """The model has a TP plan, and tp divides what it splits: the query and key/value heads, the MLP's width."""
    config = text_config(model.config)
    if not model.supports_tp_plan:
        raise ConfigError(f"parallel.tp_size={tp}: transformers has no tensor-parallel plan for model type "
                          f"{config.model_type!r} (its config class defines no base_model_tp_plan); use "
                          "parallel.tp_size=1 (parallel=fsdp shards it instead)")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    widths = {"attention heads": heads, "key/value heads": kv, "MLP width (intermediate_size)":
              getattr(config, "intermediate_size", tp)}
    for what, n in widths.items():
        if n % tp:
            raise ConfigError(f"parallel.tp_size={tp} must divide the model's {n} {what}: each rank of a "
                              f"tensor-parallel group holds 1/{tp} of them (choose a divisor of {n})")
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise ConfigError(f"parallel.tp_size={tp} with a mixture-of-experts model is not supported yet "
                          "(transformers splits experts with expert parallelism, which distsft does not set up)")


def apply_tensor_parallel(model, accelerator, tp: int):
    """Split the model's weights over the accelerator mesh's ``tp`` dimension with transformers' plan."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    check_splits(model, tp)
    checked("model.tensor")
    # the model's own plan, its `*` expanded to layer numbers (private in transformers 5.25: compat.PATCHES)
    plan, _, _ = model._resolve_parallel_plans(DistributedConfig(tp_size=tp, tp_plan="auto"))
    apply_tensor_parallelism(model, accelerator.torch_device_mesh["tp"], plan)
    model._tp_size = tp  # what Accelerate reads (get_model_tp_size) to check the model against its mesh
    return model
