"""peft.fused_add: each plain LoRA layer adds its scaled adapter output into the base output with one in-place
addmm. The same function as PEFT's forward (loss, gradients, dropout draws; fp32 to float rounding, bf16 autocast
no further from fp32 than PEFT's), three fewer elementwise passes over the layer's output per layer and step, no
graph break under compile, and PEFT's own forward wherever it does something else (DoRA, disabled or merged
adapters). Under ZeRO-3 with 2 processes: tests/integration/test_peft_distributed.py (on by default)."""

from __future__ import annotations

import copy

import pytest
import torch

from distsft.data.loader import with_positions
from distsft.model.peft import _fused_add_forward, apply_peft, fuse_adapter_add
from distsft.trainer.step import forward_losses
from tests.integration.sp_worker import packed_batch
from tests.unit.test_tiling import saved_bytes_and_grads

LAYERS = 2 * 7  # q k v o gate up down of both decoder layers


def lora(method: str = "lora", dropout: float = 0.0, fused: bool = False):
    """The tiny model with adapters through distsft's stage (alpha/r = 1.5: a scale that rounds), B not zero."""
    from distsft.config import PeftConfig
    from distsft.model.load import load_model
    from tests.conftest import typed_cfg

    torch.manual_seed(0)
    cfg = PeftConfig(method=method, r=4, alpha=6, dropout=dropout, fused_add=fused)
    model = apply_peft(load_model(typed_cfg().model, seed=0), cfg, gradient_checkpointing=False)
    for n, p in model.named_parameters():  # B starts at 0: give the adapters something to add
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    return model


def patched(model) -> int:
    return sum(getattr(m.forward, "__func__", None) is _fused_add_forward for m in model.modules())


def loss_and_grads(model, batch, seed: int = 3, autocast: bool = False):
    torch.manual_seed(seed)  # the same dropout masks for both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _, grads = saved_bytes_and_grads(model, batch)
    return loss, grads


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_add_is_pefts_lora_forward(dropout):
    batch = with_positions(packed_batch())
    peft, fused = lora(dropout=dropout), lora(dropout=dropout)
    assert patched(peft) == 0 and fuse_adapter_add(fused) == patched(fused) == LAYERS
    loss_a, grads_a = loss_and_grads(peft, batch)
    loss_b, grads_b = loss_and_grads(fused, batch)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * LAYERS
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for name in grads_a:  # fp32 reassociation only (the scale applied inside the matmul): ~5e-7 measured
        assert float((grads_a[name] - grads_b[name]).norm() / grads_a[name].norm()) <= 1e-5, name
    # control: the adapters contribute to what is compared (without them the loss moves)
    with fused.disable_adapter(), torch.no_grad():
        assert abs(forward_losses(fused, batch)[0].item() - loss_a) > 1e-3 * abs(loss_a)
    # the dropout draws are PEFT's: another seed gives another loss
    if dropout:
        assert abs(loss_and_grads(fused, batch, seed=4)[0] - loss_b) > 1e-6 * abs(loss_b)


def test_fused_add_under_bf16_autocast_is_no_further_from_fp32_than_pefts():
    """One rounding fewer (the add happens in the matmul's fp32 accumulator): not less accurate than PEFT's."""
    batch = with_positions(packed_batch())
    ref_loss, ref = loss_and_grads(lora(), batch)
    errors = []
    for fused in (False, True):
        loss, grads = loss_and_grads(lora(fused=fused), batch, autocast=True)
        flat = torch.cat([(grads[k] - ref[k]).flatten() for k in sorted(ref)])
        errors.append(float(flat.norm() / torch.cat([ref[k].flatten() for k in sorted(ref)]).norm()))
        assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert 0 < errors[1] <= 1.1 * errors[0]


def _full_width_elementwise(model, batch, tokens: int) -> tuple[int, int]:
    """(aten::mul and aten::add calls over [tokens, features] tensors, aten::addmm_ calls) in one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        saved_bytes_and_grads(model, batch)
    events = list(prof.events())
    full = [e for e in events if e.name in ("aten::mul", "aten::add") and e.input_shapes and
            len(e.input_shapes[0]) == 3 and e.input_shapes[0][0] * e.input_shapes[0][1] == tokens]
    return len(full), sum(e.name == "aten::addmm_" for e in events)


def test_fused_add_makes_three_fewer_passes_over_each_layers_output():
    """PEFT: B(A(x)) * scale (a pass), + y (a pass), and the scale again on the output gradient in backward;
    fused: none of them, one addmm_ per layer."""
    batch = with_positions(packed_batch())
    tokens = batch["input_ids"].numel()
    peft = lora()
    fused = copy.deepcopy(peft)
    fuse_adapter_add(fused)
    (elementwise_a, addmm_a), (elementwise_b, addmm_b) = (_full_width_elementwise(m, batch, tokens)
                                                          for m in (peft, fused))
    assert addmm_a == 0 and addmm_b == LAYERS
    assert elementwise_a - elementwise_b == 3 * LAYERS


def test_pefts_forward_where_it_does_something_else():
    batch = with_positions(packed_batch())
    assert patched(lora("dora", fused=True)) == 0  # DoRA's magnitude path is PEFT's
    fused = lora(fused=True)
    assert patched(fused) == LAYERS
    fused.eval()
    with torch.no_grad():
        unmerged = forward_losses(fused, batch)[0].item()
        fused.merge_adapter()  # merged weights: the base layer alone computes what base + adapter did
        merged = forward_losses(fused, batch)[0].item()
        fused.unmerge_adapter()
        again = forward_losses(fused, batch)[0].item()
        with fused.disable_adapter():
            base = forward_losses(fused, batch)[0].item()
    assert merged == pytest.approx(unmerged, rel=1e-5) and again == pytest.approx(unmerged, rel=1e-6)
    assert abs(base - unmerged) > 1e-3 * abs(unmerged)  # control: the adapters were in the merged weights


def test_fused_lora_layers_compile_whole_and_match_eager():
    from torch._dynamo.utils import counters

    from distsft.model.kernels import compile_layers, compile_stats

    torch._dynamo.reset()
    counters.clear()
    batch = with_positions(packed_batch())
    eager = lora(fused=True)
    compiled = copy.deepcopy(eager)
    compile_layers(compiled)
    loss_a, grads_a = loss_and_grads(eager, batch)
    loss_b, grads_b = loss_and_grads(compiled, batch)
    assert compile_stats()["graph_breaks"] == 0 and compile_stats()["graphs"] >= 1
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name


class _LinearReturningAView(torch.autograd.Function):
    """A base layer whose autograd function returns a view made inside it (as model.fp8's did before it was 2-D)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return (x.reshape(-1, x.shape[-1]) @ weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None


def test_a_base_output_autograd_forbids_changing_in_place_is_added_to_out_of_place():
    import types

    batch = with_positions(packed_batch())
    peft, fused = lora(), lora(fused=True)
    for model in (peft, fused):
        bases = [m for name, m in model.named_modules() if name.endswith(".base_layer")]
        assert len(bases) == LAYERS
        for m in bases:
            m.forward = types.MethodType(lambda self, x: _LinearReturningAView.apply(x, self.weight), m)
    x = torch.randn(2, 3, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified inplace"):  # why the fallback exists
        _LinearReturningAView.apply(x, torch.randn(8, 64)).reshape(-1, 8).add_(1)
    loss_a, grads_a = loss_and_grads(peft, batch)
    loss_b, grads_b = loss_and_grads(fused, batch)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for name in grads_a:
        assert float((grads_a[name] - grads_b[name]).norm() / grads_a[name].norm()) <= 1e-5, name
