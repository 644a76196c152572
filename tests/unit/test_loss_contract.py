"""Loss contract: one global batch split as 1x8, 2x4, 4x2 (micro x accum) gives the same loss and
gradients, and a mean of per-micro-batch means would not (so the test can fail)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from distsft.batch import BatchPlan
from distsft.config import DataConfig
from distsft.data.loader import StepLoader, pack
from distsft.data.prepare import prepare
from distsft.trainer.step import accumulate_gradients, forward_loss_sum
from tests.conftest import reset_accelerate, typed_cfg


@pytest.fixture(scope="module")
def data(tokenizer):
    cfg: DataConfig = typed_cfg("data.mode=pad", "data.val_fraction=0").data
    prep = prepare(cfg, tokenizer)
    return prep.train, pack(prep.train, cfg, prep.train_stats), cfg


def grads_for_split(model, data, micro, accum):
    store, rows, cfg = data
    reset_accelerate()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    loader = StepLoader(store, rows, BatchPlan(micro, accum, 1, micro * accum), 0, cfg, 0)
    step0 = next(loader.steps(epoch=0))
    model.zero_grad(set_to_none=True)
    loss, counts, _ = accumulate_gradients(model, step0, acc)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    mean_of_means = sum(forward_loss_sum(model, mb).item() / mb["n_supervised"].item() for mb in step0) / accum
    reset_accelerate()
    return loss.item(), grads, mean_of_means, counts


def test_split_invariance_of_loss_and_gradients(tiny_model, data):
    # larger random weights than the default init, so token losses differ between examples
    # (at init every token costs ~ln(vocab) and a mean of means would hide the difference)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.normal_(0, 0.3)
    results = {s: grads_for_split(tiny_model, data, *s) for s in [(8, 1), (4, 2), (2, 4)]}
    loss_ref, g_ref, _, counts_ref = results[(8, 1)]
    # examples of different lengths: supervised tokens per micro-batch differ
    per_ex = [mb["n_supervised"].item() for mb in next(StepLoader(data[0], data[1], BatchPlan(1, 8, 1, 8), 0,
                                                                   data[2], 0).steps(0))]
    assert len(set(per_ex)) > 1
    for split, (loss, g, mean_of_means, counts) in results.items():
        for field in ("supervised", "tokens", "attn_sq"):  # the same work; padding (cells) differs
            assert torch.equal(getattr(counts, field), getattr(counts_ref, field)), (split, field)
        assert loss == pytest.approx(loss_ref, rel=1e-5), split
        rel = (g - g_ref).norm() / g_ref.norm()
        assert rel <= 1e-5, (split, rel.item())
        if split != (8, 1):  # negative control: averaging per-micro-batch means is a different loss
            assert abs(mean_of_means - loss_ref) > 1e-3, split
