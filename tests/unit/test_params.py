"""distsft.model.params: the true shape of a ZeRO-3 placeholder, as the decay groups and counts see it."""

from __future__ import annotations

import torch

from distsft.model.params import count_parameters, true_ndim, true_shape
from distsft.trainer.optim import param_groups


def zero3_like(module: torch.nn.Module) -> torch.nn.Module:
    """What ZeRO-3's shard-on-load leaves: every parameter a (0,) placeholder carrying ds_shape/ds_numel."""
    for p in module.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    return module


def test_placeholders_decay_like_whole_weights():
    whole = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    sharded = zero3_like(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)))
    assert [p.ndim for p in sharded.parameters()] == [1, 1, 1, 1]  # what the old rule read
    assert [true_ndim(p) for p in sharded.parameters()] == [p.ndim for p in whole.parameters()]
    assert true_shape(sharded[0].weight) == torch.Size([3, 4])

    def shapes(groups):
        return [(g["weight_decay"], [tuple(true_shape(p)) for p in g["params"]]) for g in groups]

    assert shapes(param_groups(sharded, 0.1)) == shapes(param_groups(whole, 0.1)) == \
        [(0.1, [(3, 4)]), (0.0, [(3,), (3,), (3,)])]
    assert count_parameters(sharded) == count_parameters(whole) == (21, 21)
