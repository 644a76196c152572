"""MoE router load balancing is part of the loss contract (model.moe): the step's loss is
CE / supervised tokens + coef x the mean over the step's rows of each row's Switch load-balancing term
(checked against transformers' own load_balancing_loss_func, row by row), the same for every split of
the global batch, and the term reaches the routers (a zero coefficient gives them other gradients)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from distsft.batch import BatchPlan
from distsft.data.loader import StepLoader, pack
from distsft.data.prepare import prepare
from distsft.model import moe
from distsft.trainer.step import accumulate_gradients
from tests.conftest import reset_accelerate, typed_cfg

COEF = 0.5


def tiny_moe(coef: float = COEF):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=640, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, router_aux_loss_coef=coef, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


@pytest.fixture(scope="module", params=["pack", "pad"])
def data(request, tokenizer):
    cfg = typed_cfg(f"data.mode={request.param}", "data.val_fraction=0", "data.max_seq_len=128").data
    prep = prepare(cfg, tokenizer)
    return prep.train, pack(prep.train, cfg, prep.train_stats), cfg


def step(model, data, micro, accum):
    store, rows, cfg = data
    reset_accelerate()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    micro_batches = next(StepLoader(store, rows, BatchPlan(micro, accum, 1, micro * accum), 0, cfg, 0).steps(0))
    model.zero_grad(set_to_none=True)
    loss, _, _ = accumulate_gradients(model, micro_batches, acc)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    reset_accelerate()
    return float(loss), grads, micro_batches


def reference_loss(model, micro_batches) -> float:
    """CE / N + coef x mean over rows of transformers' load_balancing_loss_func on each row's real tokens."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    n = sum(int(mb["n_supervised"]) for mb in micro_batches)
    ce, rows = 0.0, []
    with torch.no_grad():
        for mb in micro_batches:
            kw = {"attention_mask": mb["attention_mask"]} if "attention_mask" in mb else {}
            out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], output_router_logits=True,
                        use_cache=False, **kw)  # no cache: packed documents stay apart
            logits, labels = out.logits[:, :-1].float(), mb["labels"][:, 1:]
            ce += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
            t = mb["input_ids"].size(1)
            for b, real in enumerate(mb["row_tokens"].tolist()):
                per_layer = tuple(layer[b * t: b * t + real] for layer in out.router_logits)
                rows.append(float(load_balancing_loss_func(per_layer, 4, 2)))
    return ce / n + COEF * sum(rows) / len(rows)


def test_the_step_loss_holds_the_router_term(data):
    model = tiny_moe()
    assert moe.router(model) == moe.Router(COEF, 4, 2)
    loss, _, micro_batches = step(model, data, 2, 4)
    assert loss == pytest.approx(reference_loss(model, micro_batches), rel=1e-5)


def test_any_split_gives_the_same_loss_and_gradients(data):
    model = tiny_moe()
    base_loss, base_grads, _ = step(model, data, 8, 1)
    assert any("gate" in k for k in base_grads)
    for micro, accum in ((4, 2), (2, 4), (1, 8)):
        loss, grads, _ = step(model, data, micro, accum)
        assert loss == pytest.approx(base_loss, rel=1e-5), (micro, accum)
        for k in base_grads:
            d = float((grads[k] - base_grads[k]).norm() / base_grads[k].norm().clamp(min=1e-12))
            assert d <= 1e-5, (micro, accum, k, d)


def test_negative_control_the_term_reaches_the_routers(data):
    """With coefficient 0 (no balancing: the bug) the routers get other gradients; the experts' own
    projections see the term only through the routing weights."""
    _, with_term, _ = step(tiny_moe(COEF), data, 2, 4)
    _, without, _ = step(tiny_moe(0.0), data, 2, 4)
    gate = "model.layers.0.mlp.gate.weight"
    assert float((with_term[gate] - without[gate]).norm() / without[gate].norm()) > 1e-2


def test_a_saved_moe_model_trains_end_to_end_with_the_router_term(tmp_path):
    """Through the real path (from_pretrained, supervised-position head, router logits): it trains, and the
    logged loss at the first step holds the router term (the same run with coefficient 0 logs less)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distsft.model.load import load_tokenizer
    from tests.conftest import run_tiny

    logged, scalars = {}, {}
    for coef in (COEF, 0.0):
        src = tmp_path / f"moe{coef}"
        tiny_moe(coef).save_pretrained(src)
        load_tokenizer(typed_cfg().model).save_pretrained(src)
        res = run_tiny(tmp_path / f"run{coef}", f"model.name_or_path={src}", "model.init=pretrained",
                       "trainer.max_steps=3", "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1",
                       "data.max_seq_len=128", "logging.sample_every=0", "logging.plot=false")
        losses = [x for _, x in res.summary["train_loss_history"]]
        assert res.summary["status"] == "finished" and losses[-1] < losses[0]
        logged[coef] = losses[0]
        events = EventAccumulator(str(tmp_path / f"run{coef}" / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        scalars[coef] = {t: [e.value for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    # same weights and batch: the difference is coef x the mean row term (~E x k / E = k = 2 when balanced)
    assert logged[COEF] - logged[0.0] == pytest.approx(COEF * 2, rel=0.1)
    # train/aux_loss is that term, logged on its own (so the first-step difference is the logged aux loss)
    moe_logged = scalars[COEF]
    assert moe_logged["train/aux_loss"][0] == pytest.approx(logged[COEF] - logged[0.0], rel=1e-3)
    assert len(moe_logged["train/aux_loss"]) == 3
    # expert load relative to a uniform one: the busiest expert at or above 1, the idlest at or below
    assert all(lo <= 1.0 <= hi for lo, hi in zip(moe_logged["train/expert_load_min"],
                                                  moe_logged["train/expert_load_max"]))
    assert "train/aux_loss" not in scalars[0.0]  # no router term: none logged


def test_lora_on_an_moe_says_what_it_adapts_and_refuses_dropout_on_parameters(tmp_path, caplog):
    """PEFT adapts an MoE's fused expert weights and its router as parameters (no dropout there): a default
    dropout is refused with the two ways out, and a run with dropout 0 trains and logs what got adapters."""
    import logging

    from distsft.config import ConfigError, PeftConfig
    from distsft.model.load import load_tokenizer
    from distsft.model.peft import apply_peft
    from tests.conftest import run_tiny

    with pytest.raises(ConfigError, match=r"peft.dropout=0.05: PEFT adapts this model's fused expert weights .* "
                                          r"set peft.dropout=0, or list the modules to adapt"):
        apply_peft(tiny_moe(), PeftConfig(method="lora"), False)
    src = tmp_path / "moe"
    tiny_moe().save_pretrained(src)
    load_tokenizer(typed_cfg().model).save_pretrained(src)
    with caplog.at_level(logging.INFO, logger="distsft"):
        s = run_tiny(tmp_path / "run", f"model.name_or_path={src}", "model.init=pretrained", "peft=lora",
                     "peft.dropout=0", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.save_every=0",
                     "data.max_seq_len=128", "logging.sample_every=0", "logging.plot=false").summary
    assert s["status"] == "finished"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("adapters:"))
    assert "mlp.experts.gate_up_proj (as a parameter) x2" in line and "self_attn.q_proj x2" in line
