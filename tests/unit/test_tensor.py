"""Tensor parallelism without processes: the refusals (a model type without a TP plan, sizes that do not split the
heads or the MLP, the strategies and options TP does not run with), the batch arithmetic world = dp x tp, the rows
each rank reads (a tp group's ranks the same), the device mesh's sizes, and ZeRO++'s quantized communication
(built for CUDA, refused without it). The numerics are held by tests/integration/test_tensor_parallel.py."""

from __future__ import annotations

import numpy as np
import pytest

from distsft.batch import resolve_batch
from distsft.config import ConfigError, ParallelConfig
from distsft.model.tensor import check_splits
from tests.conftest import typed_cfg


def test_a_model_type_without_a_tp_plan_is_refused_naming_it(tiny_model):
    from transformers import AutoModelForCausalLM, GPT2Config

    check_splits(tiny_model, 2)  # llama: 4 heads, 2 key/value heads, MLP 192
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                       bos_token_id=0, eos_token_id=0))
    with pytest.raises(ConfigError, match="no tensor-parallel plan for model type 'gpt2'"):
        check_splits(gpt2, 2)


def test_tp_must_divide_the_heads_and_the_mlp(tiny_model):
    with pytest.raises(ConfigError, match="parallel.tp_size=4 must divide the model's 2 key/value heads"):
        check_splits(tiny_model, 4)
    with pytest.raises(ConfigError, match="parallel.tp_size=3 must divide the model's 4 attention heads"):
        check_splits(tiny_model, 3)


@pytest.mark.parametrize("overrides, match", [
    (("parallel.tp_size=2",), "use parallel=fsdp with it .got parallel.strategy=ddp"),
    (("parallel=zero2", "parallel.tp_size=2"), "AutoTP is not wired in"),
    (("parallel=fsdp", "parallel.tp_size=2", "peft=lora"), "peft=lora with parallel.tp_size=2 is not supported"),
    (("parallel=fsdp", "parallel.tp_size=2", "model.fp8=true"), "model.fp8=true with parallel.tp_size=2"),
    (("parallel=fsdp", "parallel.tp_size=0"), "parallel.tp_size=0: expected >= 1"),
    (("parallel=zero2", "parallel.quantized_comm=true"), "use parallel=zero3 with it .got parallel.strategy=deepspeed "
                                                         "zero_stage=2"),
])
def test_combinations_tensor_parallelism_does_not_run_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        typed_cfg(*overrides)


def test_quantized_communication_is_built_for_cuda_and_refused_without_it():
    from distsft.checks import check_device_combinations
    from distsft.trainer.strategy import deepspeed_config

    cfg = typed_cfg("parallel=zero3", "parallel.quantized_comm=true")
    plan = resolve_batch(2, None, 8, 2)
    zero = deepspeed_config(cfg.parallel, cfg.trainer, plan, cuda=True)["zero_optimization"]
    assert zero["zero_quantized_weights"] is True and zero["zero_quantized_gradients"] is True
    assert "zero_quantized_weights" not in deepspeed_config(typed_cfg("parallel=zero3").parallel, cfg.trainer, plan,
                                                            cuda=True)["zero_optimization"]
    with pytest.raises(ConfigError, match="CUDA quantization kernels .* on CPU drop it"):
        check_device_combinations(cfg, cuda=False)
    check_device_combinations(cfg, cuda=True)


def test_a_tp_group_shares_the_batch_and_reads_the_same_rows(tmp_path):
    plan = resolve_batch(2, None, 8, 4, tp_size=2)
    assert (plan.dp_size, plan.grad_accum) == (2, 2)
    assert "data-parallel 2 (world_size 4 / tensor-parallel 2)" in plan.describe()
    with pytest.raises(ConfigError, match="parallel.tp_size=2 must divide the world size 3"):
        resolve_batch(2, None, 8, 3, tp_size=2)

    from distsft.data.loader import StepLoader

    loaders = [StepLoader(None, np.arange(64), plan, rank, typed_cfg().data, 0) for rank in range(4)]
    rows = [loader._firsts(0)[:4].tolist() for loader in loaders]
    assert rows[0] == rows[1] and rows[2] == rows[3] and rows[0] != rows[2]  # tp innermost: ranks 0,1 and 2,3


def test_shard_groups_count_data_parallel_ranks_and_the_mesh_keeps_tp_innermost():
    from distsft.trainer.accelerator import fsdp_parallelism
    from distsft.trainer.strategy import shard_group

    tp = ParallelConfig(strategy="fsdp", tp_size=2)
    assert shard_group(tp, 16, 8) == 4  # a node's 8 ranks are 4 data-parallel ranks
    assert shard_group(tp, 8, 8) == 4  # one node: every data-parallel rank
    with pytest.raises(ConfigError, match="does not divide the 4 data-parallel ranks .world / parallel.tp_size=2."):
        shard_group(ParallelConfig(strategy="fsdp", tp_size=2, dp_shard_size=3), 8, 8)
    pc = fsdp_parallelism(tp, 2)  # tp over both ranks: a data-parallel dimension of 1 (kept in the mesh)
    assert (pc.dp_replicate_size, pc.dp_shard_size, pc.tp_size) == (1, 1, 2)
    pc = fsdp_parallelism(ParallelConfig(strategy="fsdp", tp_size=2, dp_shard_size=2), 8)
    assert (pc.dp_replicate_size, pc.dp_shard_size, pc.tp_size) == (2, 2, 2)
    assert fsdp_parallelism(ParallelConfig(strategy="fsdp"), 4) is None  # flat FSDP: Accelerate's own mesh


def test_the_plan_divides_a_tp_ranks_state_by_tp_and_keeps_the_whole_activations_whole():
    from dataclasses import replace

    from distsft.memory import memory_estimate
    from tests.unit.test_memory import SHAPE

    cfg = typed_cfg("parallel=fsdp", "trainer.precision=bf16", "data.max_seq_len=4096")
    one = memory_estimate(cfg, SHAPE, 4, 1)
    two = memory_estimate(replace(cfg, parallel=replace(cfg.parallel, tp_size=2)), SHAPE, 4, 1)
    for key in ("weights", "gradients", "optimizer"):
        assert two[key] == pytest.approx(one[key] / 2)
    h, per_layer = SHAPE.hidden, 7 * SHAPE.hidden + 2 * SHAPE.kv_dim + 4 * SHAPE.intermediate
    assert two["activations"] / one["activations"] == pytest.approx((3 * h + (per_layer - 3 * h) / 2) / per_layer)
    assert two["logits"] == one["logits"]  # the head's output is gathered whole on every rank


def test_the_plan_offers_tp_and_sp_where_the_trainer_runs_them():
    import sys

    from distsft.comm import CLUSTERS
    from distsft.layouts import Layout, candidates
    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import published

    cands = candidates(published.LLAMA31_8B, CLUSTERS["h100_ib"])
    assert all(c.name in ("fsdp", "hsdp") for c in cands if c.tp > 1)  # TP over FSDP2
    assert all(c.name in ("zero1", "zero2", "zero3", "fsdp") for c in cands if c.sp > 1)  # no shard groups with sp
    assert Layout("fsdp", tp=2, sp=2) in cands and all(c.tp * c.sp <= 8 for c in cands)  # inside a node
    # across nodes flat fsdp names its shard group, but not with sp (flat already; a group would be refused)
    assert Layout("fsdp", tp=2).overrides(CLUSTERS["h100_ib"]).endswith("parallel.dp_shard_size=16 parallel.tp_size=2")
    assert Layout("fsdp", tp=2, sp=2).overrides(CLUSTERS["h100_ib"]) == \
        "parallel=fsdp parallel.tp_size=2 parallel.sp_size=2"
    typed_cfg(*Layout("fsdp", tp=2, sp=2).overrides(CLUSTERS["h100_ib"]).split())  # the trainer accepts it
