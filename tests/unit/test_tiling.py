"""Tiled MLP (model.tiled_mlp_shards, DeepSpeed's TiledMLP): the same loss and gradients as the plain MLP
(1e-5, fp32), with and without activation checkpointing and with LoRA adapters, and less activation memory.

Memory is measured as the bytes autograd saves for backward during the forward (the activations held at the
step's peak; storages counted once): CPU tensors have no allocator statistics to read."""

from __future__ import annotations

import copy

import pytest
import torch

from distsft.config import ConfigError
from distsft.data.loader import with_positions
from distsft.model.tiling import PATCHED, apply_tiled_mlp, decoder_mlps
from distsft.trainer.step import forward_losses
from tests.integration.sp_worker import TINY, packed_batch


def saved_bytes_and_grads(model, batch):
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_losses(model, batch)[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), sum(seen.values()), grads


def tiny(lora: bool = False, checkpointing: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), attn_implementation="sdpa").float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        for n, p in model.named_parameters():  # B starts at 0: give the adapters something to differ by
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


@pytest.mark.parametrize("lora, checkpointing", [(False, False), (False, True), (True, False)])
def test_tiled_mlp_equals_the_plain_mlp_and_saves_less_for_backward(lora, checkpointing):
    batch = with_positions(packed_batch())
    plain = tiny(lora, checkpointing)
    tiled = copy.deepcopy(plain)
    assert apply_tiled_mlp(tiled, 4) == 2 and all(getattr(m, PATCHED) == 4 for m in decoder_mlps(tiled))
    loss_a, bytes_a, grads_a = saved_bytes_and_grads(plain, batch)
    loss_b, bytes_b, grads_b = saved_bytes_and_grads(tiled, batch)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-5), n
    if not checkpointing:  # checkpointed layers save only their input either way
        assert bytes_b < 0.9 * bytes_a, (bytes_a, bytes_b)


def test_tiled_mlp_refuses_moe_layers_and_a_negative_shard_count():
    from transformers import AutoConfig, AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
        num_experts_per_tok=2))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        apply_tiled_mlp(moe, 2)
    from tests.conftest import typed_cfg

    with pytest.raises(ConfigError, match="model.tiled_mlp_shards=-1"):
        typed_cfg("model.tiled_mlp_shards=-1")
