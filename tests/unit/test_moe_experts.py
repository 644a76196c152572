"""distsft.model.moe, the experts: an MoE's sparse blocks are marked as ZeRO-3 leaf modules (DeepSpeed's own flag
shows it; a dense model gets none), and its active parameters per token (what FLOPs and MFU count) are the
non-expert weights plus top_k/num_experts of the expert weights, by hand on tiny Qwen3-MoE and Mixtral, also read
from ZeRO-3 placeholders."""

from __future__ import annotations

import logging

import pytest
import torch

from distsft.model.moe import active_parameters, mark_z3_leaf_modules, moe_blocks
from distsft.model.params import count_parameters
from tests.unit.test_params import zero3_like

V, H, LAYERS, HEADS, KV_HEADS, HEAD_DIM, E, K = 640, 64, 2, 4, 2, 16, 4, 2
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, tie_word_embeddings=False)


def tiny(arch: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"qwen3_moe": dict(num_experts=E, num_experts_per_tok=K, moe_intermediate_size=32),
             "mixtral": dict(num_local_experts=E, num_experts_per_tok=K), "llama": {}}[arch]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **COMMON, **extra))


@pytest.mark.parametrize("arch,block", [("qwen3_moe", "Qwen3MoeSparseMoeBlock"), ("mixtral", "MixtralSparseMoeBlock")])
def test_moe_blocks_become_zero3_leaf_modules(arch, block, caplog):
    from deepspeed.utils import get_z3_leaf_modules

    model = tiny(arch)
    mlps = [layer.mlp for layer in model.model.layers]
    assert moe_blocks(model) == mlps
    with caplog.at_level(logging.INFO, logger="distsft.model.moe"):
        assert mark_z3_leaf_modules(model) == [block]
    assert get_z3_leaf_modules(model) == mlps  # DeepSpeed's own view: these blocks and nothing else
    assert all(m._z3_leaf for m in mlps)
    assert f"ZeRO-3 leaf modules: {block} ({LAYERS} blocks" in caplog.text


def test_marking_sees_through_peft():
    """build_model applies LoRA before accelerate.prepare: the blocks are found and marked under the wrapper."""
    from deepspeed.utils import get_z3_leaf_modules

    from distsft.config import PeftConfig
    from distsft.model.peft import apply_peft

    model = apply_peft(tiny("qwen3_moe"), PeftConfig(method="lora", r=4, alpha=8, dropout=0.0), False)
    assert mark_z3_leaf_modules(model) == ["Qwen3MoeSparseMoeBlock"]
    assert len(get_z3_leaf_modules(model)) == LAYERS


def test_a_dense_model_marks_nothing(caplog):
    """The negative control: no MoE block, no leaf module (DeepSpeed's set_z3_leaf_modules would raise)."""
    from deepspeed.utils import get_z3_leaf_modules

    model = tiny("llama")
    assert moe_blocks(model) == []
    with caplog.at_level(logging.INFO, logger="distsft.model.moe"):
        assert mark_z3_leaf_modules(model) == []
    assert get_z3_leaf_modules(model) == []
    assert "ZeRO-3 leaf modules: none" in caplog.text


def hand_count(arch: str) -> tuple[int, int]:
    """(total, active) parameters of tiny(arch), from the config by hand."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    attention = H * q + 2 * H * kv + q * H + (2 * HEAD_DIM if arch == "qwen3_moe" else 0)  # qwen3: q/k norms
    inner = 32 if arch == "qwen3_moe" else 128  # the expert width: moe_intermediate_size / intermediate_size
    experts = E * (H * 2 * inner + inner * H)  # fused gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    per_layer = attention + E * H + 2 * H  # + the router [E, H] and two norms
    embeddings = 2 * V * H + H  # input embedding, output head (untied), final norm
    total = embeddings + LAYERS * (per_layer + experts)
    return total, embeddings + LAYERS * (per_layer + experts * K // E)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_active_parameters_by_hand(arch):
    total, active = hand_count(arch)
    model = tiny(arch)
    assert count_parameters(model) == (total, total)
    assert active_parameters(model) == active < total
    assert active_parameters(zero3_like(model)) == active  # ZeRO-3 placeholders: the full sizes


def test_a_dense_model_is_all_active():
    model = tiny("llama")
    assert active_parameters(model) == count_parameters(model)[1]
