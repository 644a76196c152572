"""``torchrun --nproc_per_node 2 -m tests.integration.sp_worker OUT.json``: sequence parallelism (DeepSpeed's
Ulysses attention, 2 CPU ranks over gloo) against one device on the same packed batch, through distsft's own
pieces (collate_packed, sequence_shard, the attention functions, forward_losses).

For each attention function (sdpa_packed, varlen's reference path) and each loss head (supervised positions,
full logits), rank 0 writes: the step loss and gradients with the whole rows on one rank, with sp=2 (each rank
its slice, gradients summed over the group), and with the slices but no all-to-all (each rank attends only to
its own slice: the negative control). Both rows have a document that straddles the split point.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "distsft" / "assets" / "tiny-llama"


def packed_batch():
    """Two rows of 20 tokens: documents of 13 + 7 and 4 + 9 + 5 (+ 2 padding); the split at 10 falls inside the
    13-token and the 9-token documents. The first 3 tokens of every document are a prompt (no labels)."""
    import numpy as np

    from distsft.data.collate import collate_packed
    from distsft.data.store import TokenStore
    from distsft.data.tokenize import IGNORE

    g = np.random.default_rng(0)
    lengths = [13, 7, 4, 9, 5]
    ids = [g.integers(3, 600, n).tolist() for n in lengths]
    labels = [[IGNORE] * 3 + x[3:] for x in ids]
    store = TokenStore(ids, labels)
    return collate_packed(store, [[0, 1], [2, 3, 4]], pad_id=0, multiple=2)


def step(model, batch, n_sup: int, group=None):
    """(step loss, flat gradient): this rank's share sum CE / N, summed over ``group`` when given."""
    from distsft.trainer.step import forward_losses

    model.zero_grad(set_to_none=True)
    share = forward_losses(model, batch)[0] / n_sup
    share.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    loss = share.detach().clone()
    if group is not None:
        dist.all_reduce(grad, group=group)
        dist.all_reduce(loss, group=group)
    return loss.item(), grad


def main(out: Path) -> None:
    import deepspeed
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from distsft.data.collate import sequence_shard
    from distsft.data.loader import with_positions
    from distsft.model import head
    from distsft.model.attention import resolve_attention

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    full = with_positions(packed_batch())
    local = sequence_shard(full, rank, 2)
    n_sup = int(full["sup_targets"].numel())
    results = []
    for impl in ("sdpa_packed", "varlen"):
        key = resolve_attention(impl, cuda=False)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), attn_implementation=key).float()
        for head_kind in ("supervised", "full"):
            model = copy.deepcopy(base)
            if head_kind == "supervised":
                head.install(model, chunk=0)
            ref_loss, ref_grad = step(model, full, n_sup)
            neg_loss, neg_grad = step(model, local, n_sup, group=dist.group.WORLD)  # no all-to-all yet
            original = ALL_ATTENTION_FUNCTIONS[key]
            UlyssesSPAttentionHF.register_with_transformers(model, core_attn_implementation=key,
                                                            sequence_parallel_size=2, micro_batch_size=2,
                                                            seq_length_is_variable=True)
            sp_loss, sp_grad = step(model, local, n_sup, group=mpu.get_sequence_parallel_group())
            ALL_ATTENTION_FUNCTIONS[key] = original
            mpu._release_sequence_parallel_groups()
            scale = ref_grad.abs().max().item()
            results.append({"attention": impl, "head": head_kind, "ref_loss": ref_loss, "sp_loss": sp_loss,
                            "neg_loss": neg_loss, "sp_grad_diff": (sp_grad - ref_grad).abs().max().item() / scale,
                            "neg_grad_diff": (neg_grad - ref_grad).abs().max().item() / scale})
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
