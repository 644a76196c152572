"""The architecture matrix, part 1: for every model family distsft documents, a tiny random config saved with
save_pretrained and loaded through distsft's own loading path keeps packed documents apart: packed rows give
the per-token losses of each document run alone (sdpa; gemma2 eager), and a plain causal mask (the negative
control) does not."""

from __future__ import annotations

import pytest
import torch

from distsft.data.collate import TokenStore, collate_packed, model_inputs
from distsft.data.packing import best_fit_decreasing
from distsft.data.tokenize import tokenize_messages
from distsft.trainer.loss import per_token_ce

COMMON = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
              pad_token_id=0, eos_token_id=2, bos_token_id=None)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
ARCHS = {
    "llama": ({}, "sdpa"),
    "qwen2": ({}, "sdpa"),
    "qwen3": ({}, "sdpa"),
    "mistral": ({}, "sdpa"),
    "phi3": ({}, "sdpa"),
    "olmo2": ({}, "sdpa"),
    "granite": ({}, "sdpa"),
    "gemma3_text": ({}, "sdpa"),
    "gemma2": ({}, "eager"),  # transformers gives gemma2 no sdpa path that isolates packed documents
    "qwen3_moe": ({"num_experts": 4, **MOE}, "sdpa"),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "sdpa"),
}


@pytest.fixture(scope="module")
def docs(tokenizer):
    from distsft.assets.build import make_examples

    return [tokenize_messages(tokenizer, e["messages"], "assistant") for e in make_examples(8, seed=11)]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_equals_alone(arch, docs, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.config import ModelConfig
    from distsft.model.load import load_model

    extra, attn = ARCHS[arch]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **COMMON, **extra)).save_pretrained(tmp_path)
    model = load_model(ModelConfig(name_or_path=str(tmp_path), init="pretrained", attn_implementation=attn), 0).eval()
    assert model.config.model_type == arch
    store = TokenStore([d["input_ids"] for d in docs], [d["labels"] for d in docs])
    rows = best_fit_decreasing(store.lengths, 160, seed=0)
    assert max(len(r) for r in rows) > 2
    batch = collate_packed(store, rows, pad_id=0)
    with torch.no_grad():
        packed = per_token_ce(model(**model_inputs(batch), use_cache=False).logits.float(), batch["labels"])
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                x, y = store.example(i)
                alone = per_token_ce(model(input_ids=torch.from_numpy(x)[None], use_cache=False).logits.float(),
                                     torch.from_numpy(y)[None])
                torch.testing.assert_close(packed[b, t:t + len(x) - 1], alone[0], rtol=1e-4, atol=1e-4, msg=arch)
                t += len(x)
        leaky = model(**model_inputs(batch), attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False)
    assert (per_token_ce(leaky.logits.float(), batch["labels"]) - packed).abs().max() >= 1e-3, arch
