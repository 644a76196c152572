"""FP8 matmuls (model.fp8): which layers run it; a frozen base makes two FP8 matmuls per layer and step (no
weight gradient), trainable layers torchao's three; loss and gradients within FP8 rounding of the plain path
(and not equal to it: the negative control that FP8 ran); LoRA and full fine-tuning runs that learn like the
plain ones and export plain weights; the refusals. On CPU torch emulates the FP8 matmul; tests/gpu runs it."""

from __future__ import annotations

import copy

import pytest
import torch

from distsft.config import ConfigError
from distsft.data.loader import with_positions
from distsft.model.fp8 import PATCHED, apply_fp8
from tests.conftest import run_tiny, typed_cfg
from tests.integration.sp_worker import packed_batch
from tests.unit.test_tiling import saved_bytes_and_grads, tiny


def _scaled_matmuls(model, batch) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        saved_bytes_and_grads(model, batch)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_mm")


def test_fp8_runs_the_frozen_base_in_two_fp8_matmuls_and_stays_within_fp8_rounding():
    batch = with_positions(packed_batch())
    plain = tiny(lora=True)
    fp8 = copy.deepcopy(plain)
    n, trainable = apply_fp8(fp8)
    assert trainable == 0
    patched = {name for name, m in fp8.named_modules() if getattr(m, PATCHED, False)}
    assert n == len(patched) == 2 * 7  # q k v o gate up down of both decoder layers
    assert all(name.endswith(".base_layer") for name in patched)  # not the adapters, not the head
    # a forward per layer, and an input gradient where one is needed: not for the first layer's q/k/v, whose
    # input (the frozen embeddings, normed) takes none; no weight gradient (torchao's Float8Linear makes one)
    assert _scaled_matmuls(fp8, batch) == n + (n - 3)
    assert _scaled_matmuls(plain, batch) == 0

    loss_a, _, grads_a = saved_bytes_and_grads(plain, batch)
    loss_b, _, grads_b = saved_bytes_and_grads(fp8, batch)
    assert grads_a.keys() == grads_b.keys() and all("lora_" in k for k in grads_a)
    assert loss_b != loss_a and abs(loss_b - loss_a) < 0.01 * abs(loss_a)
    flat_a, flat_b = (torch.cat([g[k].flatten() for k in sorted(g)]) for g in (grads_a, grads_b))
    assert torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0) > 0.98
    assert not torch.equal(flat_a, flat_b)


def test_fp8_full_fine_tuning_uses_torchaos_float8_linear_with_a_weight_gradient():
    from torchao.float8.float8_linear import Float8Linear

    batch = with_positions(packed_batch())
    plain = tiny(lora=False)
    fp8 = copy.deepcopy(plain)
    assert apply_fp8(fp8) == (0, 14)
    swapped = {name for name, m in fp8.named_modules() if isinstance(m, Float8Linear)}
    assert len(swapped) == 14 and not any("lm_head" in s or "embed" in s for s in swapped)
    assert fp8.state_dict().keys() == plain.state_dict().keys()  # checkpoints and export see the same weights
    # forward, input gradient (not for the first layer's q/k/v: the embeddings' output takes one here, as the
    # embedding trains) and weight gradient: three per layer
    assert _scaled_matmuls(fp8, batch) == 3 * 14
    loss_a, _, grads_a = saved_bytes_and_grads(plain, batch)
    loss_b, _, grads_b = saved_bytes_and_grads(fp8, batch)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    assert loss_b != loss_a and abs(loss_b - loss_a) < 0.01 * abs(loss_a)
    for name in grads_a:
        cos = torch.nn.functional.cosine_similarity(grads_a[name].flatten(), grads_b[name].flatten(), dim=0)
        assert cos > 0.95, (name, cos)


def _saved_weights(model, batch) -> tuple[set, set]:
    """(FP8 layers whose weight parameter autograd saved for backward, those of which it saved a view instead)."""
    from distsft.trainer.step import forward_losses

    weights = {id(m.weight): name for name, m in model.named_modules() if getattr(m, PATCHED, False)}
    params, views = set(), set()

    def pack(t):
        if id(t) in weights:
            params.add(weights[id(t)])
        elif t._base is not None and id(t._base) in weights:
            views.add(weights[id(t._base)])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_losses(model, batch)
    return params, views


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fp8_layers_save_the_weight_parameter_not_a_view_and_compute_torchaos_float8_linear(lora):
    """What ZeRO-3 needs (tests/integration/test_fp8_zero3_memory.py measures it): a saved view keeps the gathered
    weight alive after ZeRO-3 releases the parameter; the parameter itself does not. Full fine-tuning: the loss and
    every gradient bit for bit those of torchao's own Float8Linear.forward, which saves ``weight.t()`` (the negative
    control). LoRA: the frozen base's weights too (not the first layer's q/k/v, which take no input gradient)."""
    from torchao.float8.float8_linear import Float8Linear

    batch = with_positions(packed_batch())
    fp8 = tiny(lora=lora)
    apply_fp8(fp8)
    params, views = _saved_weights(fp8, batch)
    assert len(params) == (11 if lora else 14) and not views
    if lora:
        return
    torchao = copy.deepcopy(fp8)
    for module in torchao.modules():
        if isinstance(module, Float8Linear):
            del module.forward  # the class's own: matmul_with_hp_or_float8_args(x, weight.t())
    params, views = _saved_weights(torchao, batch)
    assert not params and len(views) == 14
    loss_a, _, grads_a = saved_bytes_and_grads(fp8, batch)
    loss_b, _, grads_b = saved_bytes_and_grads(torchao, batch)
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_fp8_needs_a_linear_layer_it_can_tile():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ConfigError, match="none whose dimensions are multiples of 16"):
        apply_fp8(AutoModelForCausalLM.from_config(cfg))


def test_fp8_refuses_a_quantised_base():
    with pytest.raises(ConfigError, match="model.fp8=true: peft.quantize=nf4 keeps the base"):
        typed_cfg("model.fp8=true", "peft=qlora")


def test_fp8_needs_fp8_tensor_cores_on_cuda():
    from distsft.checks import check_device_combinations

    cfg = typed_cfg("model.fp8=true", "peft=lora")
    with pytest.raises(ConfigError, match="compute capability 8.9.*this GPU has 8.0"):
        check_device_combinations(cfg, cuda=True, capability=(8, 0))
    check_device_combinations(cfg, cuda=True, capability=(9, 0))  # H100/H200


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_a_run_in_fp8_learns_like_the_plain_one_and_exports_plain_weights(tmp_path, peft):
    from transformers import AutoModelForCausalLM

    common = ("model=tiny_base", f"peft={peft}", "trainer.max_steps=12", "trainer.eval_every=12",
              "trainer.save_every=0", "logging.sample_every=0", "logging.plot=false",
              f"export.mode={'merged' if peft == 'lora' else 'full'}") + (("optim.lr=3e-4",) if peft == "none" else ())
    plain = run_tiny(tmp_path / "plain", *common).summary
    fp8 = run_tiny(tmp_path / "fp8", *common, "model.fp8=true").summary
    assert fp8["status"] == "finished"
    assert fp8["final_eval_loss"] != plain["final_eval_loss"]
    assert abs(fp8["final_eval_loss"] - plain["final_eval_loss"]) < 0.02 * plain["final_eval_loss"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8" / "final")  # plain weights: nothing FP8 in it
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert not any(getattr(m, PATCHED, False) for m in merged.modules())
    assert {type(m).__name__ for m in merged.modules()} == {
        type(m).__name__ for m in AutoModelForCausalLM.from_pretrained(tmp_path / "plain" / "final").modules()}


@pytest.mark.slow
def test_fp8_layers_compile_whole_and_match_eager():
    """model.compile with model.fp8 (what the GPU wants: torchao's casts fused): the FP8 base matmul is one op in
    the layer's graph (no graph break: the function is allowed in the graph whole, as torchao's own), and the
    compiled loss and adapter gradients equal eager FP8's."""
    from torch._dynamo.utils import counters

    from distsft.model.kernels import compile_layers, compile_stats

    torch._dynamo.reset()
    counters.clear()
    batch = with_positions(packed_batch())
    eager = tiny(lora=True)
    apply_fp8(eager)
    compiled = copy.deepcopy(eager)
    compile_layers(compiled)
    loss_a, _, grads_a = saved_bytes_and_grads(eager, batch)
    loss_b, _, grads_b = saved_bytes_and_grads(compiled, batch)
    assert compile_stats()["graph_breaks"] == 0 and compile_stats()["graphs"] >= 1
    assert abs(loss_b - loss_a) <= 1e-5 * abs(loss_a)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name
