"""Sequence parallelism without processes: the slice of a packed row (targets shifted over the whole row,
counts that sum to the whole), the batch arithmetic world = dp x sp, which rows each rank reads, the
attention that builds its mask from position_ids, and the refusals (each naming the fix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distsft.batch import resolve_batch
from distsft.config import ConfigError
from distsft.data.collate import sequence_shard
from distsft.data.loader import StepLoader, with_positions
from distsft.data.store import TokenStore
from distsft.data.tokenize import IGNORE
from tests.conftest import typed_cfg
from tests.integration.sp_worker import TINY, packed_batch


def counted(batch):
    """The batch with the counts the loader adds (as _MicroBatches does)."""
    batch = with_positions(batch)
    batch["n_supervised"] = (batch["labels"] != IGNORE).sum()
    batch["row_tokens"] = torch.tensor([20, 18])
    batch["n_tokens"], batch["n_cells"] = batch["row_tokens"].sum(), torch.tensor(batch["input_ids"].numel())
    batch["n_rows"], batch["attn_sq"] = torch.tensor(2), torch.tensor(13.0 ** 2 + 7 ** 2 + 4 ** 2 + 9 ** 2 + 5 ** 2)
    return batch


def test_slices_join_into_the_row_and_targets_cross_the_split():
    full = counted(packed_batch())
    assert full["input_ids"].shape == (2, 20)
    parts = [sequence_shard(full, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts], 1), full["input_ids"])
    assert torch.equal(torch.cat([p["position_ids"] for p in parts], 1), full["position_ids"])
    shifted = torch.cat([full["labels"][:, 1:], torch.full((2, 1), IGNORE)], 1)
    assert torch.equal(torch.cat([p["targets"] for p in parts], 1), shifted)
    # row 0: the 13-token document straddles position 10; rank 0's last position predicts rank 1's first token
    assert parts[0]["targets"][0, -1] == parts[1]["input_ids"][0, 0] != IGNORE
    assert parts[1]["position_ids"][0, 0] == 10  # the document goes on: positions do not restart at the split
    # every count summed over the group is the whole row's, once
    for key in ("n_supervised", "n_tokens", "n_cells", "n_rows", "attn_sq"):
        assert sum(float(p[key]) for p in parts) == float(full[key]), key
    assert sum(p["sup_targets"].numel() for p in parts) == full["sup_targets"].numel()
    # the slice's supervised positions index its own flattened [B, T/2] layout
    for p in parts:
        flat = p["targets"].reshape(-1)
        assert torch.equal(flat[p["sup_index"]], p["sup_targets"])
    assert "labels" not in parts[0]  # nothing downstream may shift a slice a second time


def test_a_row_that_does_not_split_evenly_is_refused():
    full = with_positions(packed_batch())
    with pytest.raises(ValueError, match="equal slices"):
        sequence_shard({**full, "input_ids": full["input_ids"][:, :19]}, 0, 2)


def test_batch_arithmetic_counts_data_parallel_replicas():
    plan = resolve_batch(4, None, 16, 4, sp_size=2)
    assert (plan.dp_size, plan.grad_accum, plan.world_size) == (2, 2, 4)
    assert "data-parallel 2 (world_size 4 / sequence-parallel 2)" in plan.describe()
    with pytest.raises(ConfigError, match="parallel.sp_size=2 must divide the world size 3"):
        resolve_batch(4, None, 16, 3, sp_size=2)
    with pytest.raises(ConfigError, match=r"data-parallel size 2 \(world_size / parallel.sp_size=2\)"):
        resolve_batch(3, None, 16, 4, sp_size=2)


def store_of(n: int) -> TokenStore:
    rng = np.random.default_rng(1)
    ids = [rng.integers(3, 600, int(k)).tolist() for k in rng.integers(5, 30, n)]
    return TokenStore(ids, [[IGNORE] + x[1:] for x in ids])


def test_the_ranks_of_a_group_read_the_same_rows_and_replicas_read_others():
    cfg = typed_cfg("parallel=zero2", "parallel.sp_size=2", "data.max_seq_len=64")
    store = store_of(200)
    from distsft.data.loader import pack
    from distsft.data.prepare import SplitStats

    rows = pack(store, cfg.data, SplitStats())
    plan = resolve_batch(2, None, 8, 4, sp_size=2)
    first = {r: next(iter(StepLoader(store, rows, plan, r, cfg.data, 0).steps(0))) for r in range(4)}
    ids = {r: torch.cat([mb["example_ids"] for mb in first[r]]).tolist() for r in range(4)}
    assert ids[0] == ids[1] and ids[2] == ids[3] and not set(ids[0]) & set(ids[2])
    one = resolve_batch(2, None, 8, 1)  # one process reads the same step's rows
    whole = torch.cat([mb["example_ids"] for mb in next(iter(StepLoader(store, rows, one, 0, cfg.data, 0).steps(0)))])
    assert sorted(ids[0] + ids[2]) == sorted(whole.tolist())
    for r in range(4):  # each rank holds its slice: shifted targets, no labels left to shift
        assert all("targets" in mb and "labels" not in mb for mb in first[r])
    # eval: every batch has micro rows (DeepSpeed's Ulysses attention is built for that many), fillers ignored
    from distsft.data.loader import eval_batches
    from distsft.data.packing import Rows

    five = Rows.of(list(rows)[:5])

    ev = eval_batches(store, five, 2, 1, 4, cfg.data, 0, sp_size=2)  # replica 0 of 2: rows 0, 2, 4
    assert len(ev) == 2 and all(b["input_ids"].shape[0] == 2 for b in ev)
    whole = sum(b["sup_targets"].numel() for b in eval_batches(store, five, 2, 0, 1, cfg.data, 0))
    split = sum(b["sup_targets"].numel() for r in range(4) for b in eval_batches(store, five, 2, r, 4, cfg.data,
                                                                                 0, sp_size=2))
    assert split == whole > 0


def test_packed_sdpa_equals_sdpa_with_transformers_block_mask_and_a_causal_mask_differs():
    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.model.attention import resolve_attention

    batch = with_positions(packed_batch())
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), attn_implementation="sdpa").float()
    packed = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY),
                                              attn_implementation=resolve_attention("sdpa_packed", False)).float()
    packed.load_state_dict(ref.state_dict())
    with torch.no_grad():
        a, b = ref(**inputs).logits, packed(**inputs).logits
        leaky = ref(input_ids=batch["input_ids"], use_cache=False).logits  # plain causal over the whole row
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, leaky, atol=1e-3)


@pytest.mark.parametrize("overrides, match", [
    (("parallel.sp_size=2",), "use parallel=zero1, zero2, zero3 or fsdp with it .got parallel.strategy=ddp"),
    (("parallel=fsdp", "parallel.sp_size=2", "parallel.dp_shard_size=1"), "parallel.dp_shard_size=1 with parallel.sp"),
    (("parallel=zero2", "parallel.sp_size=2", "data.mode=pad"), "use data.mode=pack"),
    (("parallel=zero2", "parallel.sp_size=2", "model.attn_implementation=eager"), "use sdpa or varlen"),
    (("parallel=zero2", "parallel.sp_size=2", "model.kernels=liger"), "model.kernels=liger with parallel.sp_size=2"),
    (("parallel=zero2", "parallel.sp_size=2", "model.compile=true"), "model.compile=true with parallel.sp_size=2"),
    (("parallel=zero2", "parallel.sp_size=0"), "parallel.sp_size=0: expected >= 1"),
])
def test_combinations_sequence_parallelism_does_not_run_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        typed_cfg(*overrides)


def test_heads_must_split_across_the_group_and_moe_is_refused():
    from transformers import AutoConfig

    from distsft.model.sequence import check_heads

    tiny = AutoConfig.from_pretrained(TINY)  # 4 query heads, 2 key/value heads
    check_heads(tiny, 2)
    check_heads(tiny, 4)  # key/value heads replicated: 4 is a multiple of 2
    with pytest.raises(ConfigError, match="must divide the model's 4 attention heads"):
        check_heads(tiny, 3)
    moe = AutoConfig.for_model("qwen3_moe", num_attention_heads=4, num_key_value_heads=2, num_experts=4)
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        check_heads(moe, 2)
