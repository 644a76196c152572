"""Model pipeline (peft): quantise, adapt, checkpoint — model transformations in a fixed order.

    load (quantised by bitsandbytes when peft.quantize is set)
      -> prepare_model_for_kbit_training (quantised only: norms in fp32, input grads on)
      -> LoRA / DoRA adapters (peft)
      -> gradient checkpointing (non-reentrant)

Full fine-tuning and PEFT share one training loop: these are the only differences.
"""

from __future__ import annotations

import logging
import types

import torch

from ..compat import checked
from ..config import ConfigError, PeftConfig

log = logging.getLogger(__name__)


def quantization_config(cfg: PeftConfig, zero3: bool = False):
    """BitsAndBytesConfig for from_pretrained, or None."""
    if cfg.quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, cfg.compute_dtype)
    if cfg.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=compute,
                              # ZeRO-3 shards parameters by dtype: 4-bit storage must match the compute dtype
                              bnb_4bit_quant_storage=compute if zero3 else torch.uint8)


def apply_peft(model, cfg: PeftConfig, gradient_checkpointing: bool, checkpoint_every: int = 1,
               bf16_autocast: bool = False, zero3: bool = False):
    """The transformations after loading, in the documented order. ``bf16_autocast``: training runs
    under bf16 autocast (trainer.precision=bf16), so adapters need no fp32 copy of their inputs. ``zero3``:
    DeepSpeed ZeRO-3 will shard the parameters (the fused add reads an adapter weight outside its module)."""
    if cfg.quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method != "none":
        from peft import LoraConfig, get_peft_model

        targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
        lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          use_dora=cfg.method == "dora", task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            if "lora_dropout" not in str(e):
                raise
            raise ConfigError(f"peft.dropout={cfg.dropout}: PEFT adapts this model's fused expert weights (an MoE: "
                              "experts.gate_up_proj/down_proj) and its router as parameters, and a parameter adapter "
                              "takes no dropout: set peft.dropout=0, or list the modules to adapt, e.g. "
                              "peft.target_modules=[q_proj,k_proj,v_proj,o_proj] to leave the experts and the router "
                              "alone") from None
        log.info("adapters: %s", describe_adapters(model))
        if zero3 and bf16_autocast:
            adapters_in_engine_dtype(model)
        if bf16_autocast:
            adapters_under_autocast(model)
        if cfg.fused_add:
            log.info("adapters: %d LoRA layers add their output inside the adapter matmul (peft.fused_add)",
                     fuse_adapter_add(model, zero3))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if checkpoint_every > 1:
            checkpoint_only_every(model, checkpoint_every)
        if cfg.method != "none":
            # frozen embeddings give no grad to checkpointed blocks' inputs; adapters need one
            model.enable_input_require_grads()
    return model


def describe_adapters(model) -> str:
    """Which modules (per layer kind) got adapters, and which *parameters* of a module (the fused expert
    weights and the router of an MoE model, which PEFT adapts as parameters, not as Linear layers)."""
    import re
    from collections import Counter

    from peft.tuners.tuners_utils import BaseTunerLayer

    kinds: Counter = Counter()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        # several parameters of one module nest their wrappers (experts -> experts.base_layer)
        kind = re.sub(r"\.\d+\.", ".N.", re.sub(r"(\.base_layer)+$", "", name.removeprefix("base_model.model.")))
        param = getattr(module, "parameter_name", None)
        kinds[f"{kind}.{param} (as a parameter)" if param else kind] += 1
    if not kinds:
        return "none"
    return f"{sum(kinds.values())} modules: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


def adapters_in_engine_dtype(model) -> None:
    """ZeRO-3 under bf16: the base was loaded into bf16 shards (zero.Init), but the adapters are made afterwards,
    in fp32, and the engine shards them as they are (ZeRO-1/2 cast the whole module to bf16 themselves). Cast them
    to bf16 as well: the engine's optimizer keeps their fp32 masters, as for every other trainable weight, and an
    adapter's bf16 input meets a bf16 weight (fp32 ones failed: 'expected m1 and m2 to have the same dtype')."""
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)


def adapters_under_autocast(model) -> int:
    """Stop PEFT from casting each adapted layer's input to the adapters' fp32 dtype: under bf16 autocast
    the adapter matmuls run in bf16 anyway, so the cast only writes (and backpropagates through) an fp32
    copy of every activation entering a LoRA layer (~20% of an 8B LoRA step on an H100). The adapter
    weights and their optimizer state stay fp32. Only for trainer.precision=bf16. Returns layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def fuse_adapter_add(model, zero3: bool = False) -> int:
    """Patch plain LoRA layers (PEFT's ``lora.Linear``) so each adds its adapter's output into the base layer's
    output inside the adapter's second matmul: ``y.addmm_(A(x), B^T, alpha=scale)`` in place, where PEFT writes
    ``B(A(x))``, scales it and adds it to ``y`` (three elementwise passes over ``[tokens, out_features]``, and
    one more in backward for the scale). A layer with ``out_features`` outputs reads and writes its output
    twice instead of six times; backward passes the output gradient through unchanged. Nothing else moves:
    the adapters, their dropout and its random draws, the weights that are saved and merged. DoRA (a LoRA
    variant) and the quantised bases' LoRA classes (not ``lora.Linear``) keep PEFT's forward, as does any call
    PEFT's forward handles specially (disabled, merged or mixed adapters). Under ZeRO-3 each B weight is
    registered as an external parameter of its layer, so DeepSpeed gathers it around the layer, where it is
    read outside ``lora_B``'s own forward. Returns the layers patched."""
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear and not m.lora_variant]  # DoRA is a variant
    if layers:
        checked("model.peft")
    for m in layers:
        m.forward = types.MethodType(_fused_add_forward, m)
    if zero3:
        import deepspeed

        for m in layers:
            for b in m.lora_B.values():
                deepspeed.zero.register_external_parameter(m, b.weight)
    return len(layers)


def _fused_add_forward(self, x, *args, **kwargs):
    """PEFT's ``lora.Linear.forward`` for one active plain adapter, its scaled output added by ``addmm_``."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant
            or self.lora_B[active[0]].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    result = self.base_layer(x)
    a = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    if a.dtype != result.dtype:  # fp32 adapters on a bf16 base outside autocast: PEFT adds in fp32, then casts
        return (result + lora_b(a) * self.scaling[name]).to(result.dtype)
    out, a, b = result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]), lora_b.weight.to(result.dtype).t()
    # a base layer's autograd function that returns a view: autograd forbids adding to it in place (the check is
    # a graph break under compile, where the layers are torch's or model.fp8's, whose outputs are not views)
    if not torch.compiler.is_compiling() and result._is_view():
        return torch.addmm(out, a, b, alpha=self.scaling[name]).view(result.shape)
    # a linear layer's output is not saved for its backward: it may be added to in place (autograd checks)
    return out.addmm_(a, b, alpha=self.scaling[name]).view(result.shape)


def checkpoint_only_every(model, n: int) -> int:
    """Keep recomputation on decoder layers 0, n, 2n, ... only (the others keep their activations):
    between full checkpointing (least memory) and none (least compute). Returns the layers recomputed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % n == 0
    return sum(layer.gradient_checkpointing for layer in layers)
