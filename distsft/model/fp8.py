"""Model pipeline (fp8, after the adapters): the decoder's matmuls in FP8 (``model.fp8``), torchao float8 training.

Trainable linear layers (full fine-tuning) become torchao's ``Float8Linear``: forward, input gradient and
weight gradient in FP8 with dynamic tensor-wise scales, the fp32 master weights cast on the fly (torchao's
recipe, as in torchtitan). Frozen ones (the base under LoRA/DoRA) run two matmuls instead of three (below).

Both run this stage's autograd function, which saves the weight *parameter* for backward. torchao's own
``Float8Linear.forward`` saves ``weight.t()``, a view of the weight ZeRO-3 gathered for the layer; a view keeps
the gathered storage alive after ZeRO-3 releases the parameter (``param.data`` becomes a placeholder), so every
layer's full weight stayed gathered until backward (full fine-tuning, 4 layers of 3 MiB, 2 processes: 15.5 MB
held for backward after the forward, 2.9 MB without FP8; tests/integration/test_fp8_zero3_memory.py). The
parameter follows its ``.data``: released after the layer, gathered again by ZeRO-3's pre-backward hook before
the function's backward reads it (as DeepSpeed's own ``LinearFunctionForZeroStage3`` does); now 2.9 MB with FP8
too. The casts and scaled matmuls are torchao's: the loss and gradients are its ``Float8Linear``'s, bit for bit.

Under LoRA almost every FLOP of a step is a matmul with a frozen base weight: the forward, its recompute
under gradient checkpointing, and the gradient with respect to the layer's input (a frozen weight has no
gradient of its own). FP8 tensor cores (H100/H200) run twice the dense bf16 rate. With ``model.fp8=true``
each frozen linear layer of the decoder runs

    forward   y  = x_e4m3 @ W_e4m3^T          dynamic tensor-wise scales (amax of x, of W), output in x's dtype
    backward  dx = dy_e5m2 @ W_e4m3           (the output gradient in e5m2: more range, less precision)

and no weight-gradient matmul. torchao's ``Float8Linear`` computes that third matmul for every layer and
lets autograd drop it for a frozen weight (a third more matmul work than needed); this stage's function calls
torchao's casts and its scaled matmul (``hp_tensor_to_float8_dynamic``, ``torch.mm`` on its float8 tensors)
and makes the weight-gradient matmul only for a weight that takes a gradient. The weights are stored as before
(the checkpoint, the merge and the export do not change); the layer's ``forward`` is patched on the instance,
so ZeRO-3's and FSDP2's hooks still gather the weight around it (and again for backward, as above).

Left in the compute dtype, either way: the adapters (small, and trained), the output head and embeddings (the loss is
sensitive to them), MoE routers, and layers whose dimensions are not multiples of 16 (the FP8 matmul's
alignment). This is a precision mode of its own: the loss differs from bf16 by FP8 rounding (about 2 of e4m3's
3 mantissa bits). torchao's casts are separate elementwise kernels unless compiled: pair it with
``model.compile=true``. On CPU torch emulates the FP8 matmul (slow; for checking).
"""

from __future__ import annotations

import functools
import types

import torch

from ..compat import checked
from ..config import ConfigError

PATCHED = "_distsft_fp8"  # on a patched linear layer: True
AO = types.SimpleNamespace()  # torchao's pieces, filled by apply_fp8 (read as globals: torch.compile traces them)


@functools.cache
def _torchao():
    """torchao's float8 pieces and the matmul configuration of its default (tensor-wise, dynamic) recipe."""
    try:
        from torchao.float8.config import Float8LinearConfig, e4m3_dtype, e5m2_dtype
        from torchao.float8.float8_linear import Float8Linear
        from torchao.float8.float8_linear_utils import convert_to_float8_training
        from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
        from torchao.float8.float8_training_tensor import GemmInputRole
    except ImportError as e:
        raise ConfigError(f"model.fp8=true needs torchao ({e}): pip install 'distsft[fp8]'") from e
    with torch.device("meta"):  # torchao's own defaults (fast accumulation in the forward, not in backward)
        reference = Float8Linear(16, 16, bias=False, config=Float8LinearConfig())
    try:  # what convert_to_float8_training does first: a Triton FP8 store miscompile under torch.compile
        from torchao.float8._inductor_patch import _patch_inductor_min_max_codegen

        _patch_inductor_min_max_codegen()
    except ImportError:  # older torchao: nothing to patch
        pass
    AO.__dict__.update(cast=hp_tensor_to_float8_dynamic, roles=GemmInputRole, e4m3=e4m3_dtype, e5m2=e5m2_dtype,
                       mm=reference.linear_mm_config, convert=convert_to_float8_training, config=Float8LinearConfig,
                       linear=Float8Linear)
    return AO


@torch._dynamo.allow_in_graph  # as torchao's own matmul: compiled whole (AOT autograd traces its casts), not inlined
class _Fp8Matmul(torch.autograd.Function):
    """x [tokens, in] @ weight[out, in]^T in FP8 (torchao's tensor-wise recipe): the weight gradient's matmul only
    for a weight that takes one (two matmuls, not three, for a frozen base). Saves ``weight`` itself, the
    parameter, not a view of it (ZeRO-3 releases it after the layer and gathers it again for backward).
    2-D in and out: a view made inside an autograd function could not be added to in place (peft.fused_add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ao = AO
        ctx.save_for_backward(x if weight.requires_grad else None, weight)  # x: for the weight gradient only
        x8 = ao.cast(x, ao.e4m3, ao.mm, gemm_input_role=ao.roles.INPUT)
        w8 = ao.cast(weight.t(), ao.e4m3, ao.mm, gemm_input_role=ao.roles.WEIGHT)
        return torch.mm(x8, w8)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ao = AO
        x, weight = ctx.saved_tensors  # weight: gathered again by ZeRO-3 (FSDP2) before this layer's backward
        g8 = ao.cast(grad, ao.e5m2, ao.mm, gemm_input_role=ao.roles.GRAD_OUTPUT)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w8 = ao.cast(weight, ao.e4m3, ao.mm, gemm_input_role=ao.roles.WEIGHT)  # [out, in]: dx = dy @ W
            dx = torch.mm(g8, w8)
        if ctx.needs_input_grad[1]:  # dW [out, in] = dy^T @ x, in the output gradient's dtype (as torchao's)
            dw = torch.mm(g8.t(), ao.cast(x, ao.e4m3, ao.mm, gemm_input_role=ao.roles.INPUT))
        return dx, dw


def _fp8_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    if torch.is_autocast_enabled(device):  # as F.linear would: compute in the autocast dtype
        x = x.to(torch.get_autocast_dtype(device))
    weight = self.weight
    if not weight.requires_grad:  # a frozen fp32 base under bf16 autocast: one dtype for the scaled matmul
        weight = weight.to(x.dtype)  # (a trainable master is cast from fp32, as torchao's Float8Linear does)
    with torch.autocast(device, enabled=False):
        out = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], self.out_features)
    return out if self.bias is None else out + self.bias.to(out.dtype)


def _eligible(name: str, module: torch.nn.Module) -> bool:
    """A linear layer of a decoder layer: not an adapter, not a router, dimensions FP8 can tile."""
    return (type(module) is torch.nn.Linear and ".layers." in f".{name}" and "lora_" not in name
            and not name.endswith((".gate", ".router", "router.layer"))
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(model: torch.nn.Module) -> tuple[int, int]:
    """Run the decoder's linear layers in FP8: (frozen ones patched, trainable ones made torchao Float8Linear)."""
    ao = _torchao()
    checked("model.fp8")
    frozen = 0
    for name, module in model.named_modules():
        if _eligible(name, module) and not module.weight.requires_grad:
            module.forward = types.MethodType(_fp8_forward, module)
            setattr(module, PATCHED, True)
            frozen += 1
    ao.convert(model, module_filter_fn=lambda m, name: _eligible(name, m) and m.weight.requires_grad,
               config=ao.config())
    trainable = [m for m in model.modules() if isinstance(m, ao.linear)]
    for module in trainable:  # torchao's module and config, this stage's forward (which saves the parameter)
        module.forward = types.MethodType(_fp8_forward, module)
        setattr(module, PATCHED, True)
    if not frozen + len(trainable):
        raise ConfigError("model.fp8=true: no linear layer in the decoder can run in FP8 (none whose dimensions "
                          "are multiples of 16); drop model.fp8")
    return frozen, len(trainable)
