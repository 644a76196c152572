"""Checkpoint offload (model.offload_checkpoints): the same loss and gradients as plain checkpointing, and the
tensors it moves to host memory are exactly the recomputed layers' inputs.

On CPU the host is the device, so nothing is copied and no allocator can show a drop; what is measured is the
bytes autograd keeps for backward *outside* the offload hook (what would stay on the GPU), next to the bytes the
hook took. tests/gpu/test_gpu.py measures max_memory_allocated on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from distsft.config import ConfigError
from distsft.data.loader import with_positions
from distsft.model.offload import PATCHED, apply_checkpoint_offload
from distsft.model.peft import checkpoint_only_every
from tests.integration.sp_worker import packed_batch
from tests.unit.test_tiling import saved_bytes_and_grads, tiny


def _compare(plain, offloaded, batch):
    loss_a, kept_a, grads_a = saved_bytes_and_grads(plain, batch)
    loss_b, kept_b, grads_b = saved_bytes_and_grads(offloaded, batch)
    assert loss_b == loss_a
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n
    return kept_a, kept_b


@pytest.mark.parametrize("lora", [False, True])
def test_offload_keeps_numerics_and_moves_exactly_the_layer_inputs(lora):
    batch = with_positions(packed_batch())
    plain = tiny(lora, checkpointing=True)
    offloaded = copy.deepcopy(plain)
    layers, stats = apply_checkpoint_offload(offloaded)
    assert layers == 2
    kept_a, kept_b = _compare(plain, offloaded, batch)
    hidden = offloaded.config.hidden_size
    tokens = batch["input_ids"].numel()
    one_input = tokens * hidden * 4  # [B, T, h] fp32
    assert stats == {"bytes": layers * one_input, "tensors": layers}  # each layer's input, once, nothing else
    assert kept_a - kept_b == layers * one_input  # and those bytes no longer stay with the device


def test_offload_follows_checkpoint_every_and_is_refused_without_checkpointing():
    batch = with_positions(packed_batch())
    model = tiny(checkpointing=True)
    assert checkpoint_only_every(model, 2) == 1
    layers, stats = apply_checkpoint_offload(model)
    assert layers == 1 and all(getattr(m, PATCHED, False) == (i == 0) for i, m in enumerate(model.model.layers))
    saved_bytes_and_grads(model, batch)
    assert stats["tensors"] == 1
    with pytest.raises(ConfigError, match="no decoder layer is recomputed"):
        apply_checkpoint_offload(tiny(checkpointing=False))
    from tests.conftest import typed_cfg

    with pytest.raises(ConfigError, match="add model.gradient_checkpointing=true"):
        typed_cfg("model.offload_checkpoints=true")
