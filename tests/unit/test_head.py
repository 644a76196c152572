"""model.head: the output head at supervised positions only, in chunks, equals the plain full-logits loss
(value and every gradient, fp32) and holds less memory; a shifted position set differs (negative control)."""

from __future__ import annotations

import copy

import pytest
import torch

from distsft.batch import BatchPlan
from distsft.data.collate import model_inputs, supervised_positions
from distsft.data.loader import StepLoader, pack
from distsft.data.prepare import prepare
from distsft.model import head
from distsft.trainer.step import forward_loss_sum
from distsft.trainer.loss import token_ce_sum
from tests.conftest import peak_allocated, typed_cfg


@pytest.fixture(scope="module")
def batch(tokenizer):
    cfg = typed_cfg("data.val_fraction=0").data
    prep = prepare(cfg, tokenizer)
    loader = StepLoader(prep.train, pack(prep.train, cfg, prep.train_stats), BatchPlan(4, 1, 1, 4), 0, cfg,
                        tokenizer.pad_token_id)
    return next(loader.steps(0))[0]


def plain_loss(model, batch):
    return token_ce_sum(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])


def loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        d = float((a[1][k] - b[1][k]).norm() / b[1][k].norm())
        assert d <= 1e-5, (k, d)


def test_batch_carries_the_supervised_positions(batch):
    labels = batch["labels"]
    t = labels.size(1)
    idx, targets = batch["sup_index"], batch["sup_targets"]
    assert len(idx) == int(batch["n_supervised"]) > 0  # the first label of a row is never supervised
    assert torch.equal(labels[idx // t, idx % t + 1], targets)


@pytest.mark.parametrize("chunk", [0, 37, 100_000])  # all at once, many recomputed chunks, one chunk
def test_head_loss_equals_the_plain_path(tiny_model, batch, chunk):
    assert batch["n_supervised"] > 37 * 3
    plain = loss_and_grads(tiny_model, plain_loss, batch)
    patched = copy.deepcopy(tiny_model)
    assert head.install(patched, chunk).startswith("supervised positions")
    assert_same(loss_and_grads(patched, forward_loss_sum, batch), plain)
    # outside a training forward the head is the model's own: full logits
    with torch.no_grad():
        torch.testing.assert_close(patched(**model_inputs(batch)).logits, tiny_model(**model_inputs(batch)).logits)


def test_head_loss_with_an_adapted_head_equals_the_plain_path(tiny_model, batch):
    """LoRA on the output head too: the patched head runs PEFT's forward (adapter included)."""
    from distsft.config import PeftConfig
    from distsft.model.peft import apply_peft

    torch.manual_seed(0)
    lora = apply_peft(tiny_model, PeftConfig(method="lora", r=4, dropout=0.0, target_modules=["q_proj", "lm_head"]),
                      gradient_checkpointing=False)
    for n, p in lora.named_parameters():  # non-zero B: the adapters change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    plain = loss_and_grads(lora, plain_loss, batch)
    assert head.install(lora, 50).endswith("in one chunk")  # sub-modules: never a rank-dependent call count
    assert head.installed(lora) and any("lm_head.lora" in k for k in plain[1])
    assert_same(loss_and_grads(lora, forward_loss_sum, batch), plain)


def test_negative_control_a_shifted_position_set_differs(tiny_model, batch):
    patched = copy.deepcopy(tiny_model)
    head.install(patched, 0)
    idx, targets = supervised_positions(batch["labels"])
    with torch.no_grad(), head.supervised(patched, idx + 1, targets):  # off by one position
        shifted = patched(**model_inputs(batch)).logits
        assert not torch.allclose(shifted, plain_loss(tiny_model, batch), rtol=1e-3)


def test_models_that_transform_logits_keep_the_plain_path(tiny_model):
    tiny_model.config.final_logit_softcapping = 30.0
    assert head.install(tiny_model, 0).startswith("plain")
    assert not head.installed(tiny_model)


def test_the_chunked_head_holds_less_memory(tiny_model, batch):
    """Peak tensor bytes of forward + backward (torch.profiler's allocator events on CPU)."""
    def step(model, fn):
        return lambda: fn(model, batch).backward()

    plain, _ = peak_allocated(step(tiny_model, plain_loss))
    patched = copy.deepcopy(tiny_model)
    head.install(patched, 64)
    chunked, _ = peak_allocated(step(patched, forward_loss_sum))
    print(f"peak allocated: plain {plain / 2**20:.2f} MiB, supervised head in chunks of 64 {chunked / 2**20:.2f} MiB")
    assert chunked < 0.75 * plain
