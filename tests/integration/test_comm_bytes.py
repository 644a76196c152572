"""The plan's bytes are the bytes that move (distsft.comm, principle 17). Torch's profiler records every collective
call of optimizer steps 3-4 below every wrapper (tests/integration/comm_entry.py: gloo's own record, DDP's C++
buckets included); the bytes each rank hands to the collectives are compared, per kind, with the model's:

    reductions (all-reduce, reduce-scatter; gloo has no reduce-scatter, so DeepSpeed and FSDP2 all-reduce there)
        the model's tensor bytes (``Collective.size``): every rank hands in the whole tensor
    gathers (all-gather)
        the model's tensor bytes / group size: every rank hands in its shard

within 5% per kind, for ddp, zero2, zero3 and fsdp on 2 processes, and HSDP and ZeRO-3 hpZ on 4 (2 groups x 2).
(Measured 2026-12-07 on the tiny model, fp32: the trainer's own scalar all-reduces are the only extra, < 0.01%.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import launch, typed_cfg

pytestmark = pytest.mark.multiproc
STEPS = ["trainer.max_steps=5", "trainer.save_every=0", "trainer.eval_every=0", "logging.sample_every=0"]
DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
               "unsigned char": 1, "bool": 1}
REDUCTIONS = ("all_reduce", "reduce_scatter", "reduce", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced")


def measured(out: Path, steps: int = 2) -> dict[str, float]:
    """Bytes per optimizer step that rank 0 handed to reductions and to gathers."""
    per = {"reduce": 0.0, "gather": 0.0}
    for name, dtype, dims in json.loads((out / "comm" / "rank_0.json").read_text()):
        op = name.split(":", 1)[1]
        size = sum(math.prod(d) for d in dims or [] if d) * DTYPE_BYTES[dtype]
        kind = "reduce" if op in REDUCTIONS else "gather" if "gather" in op else None
        if kind:
            per[kind] += size / steps
    return per


def predicted(layout: str, world: int, shard: int = 0, micro: int = 4) -> dict[str, float]:
    """The same bytes from distsft.comm's collectives for this layout (one node: every rank on it)."""
    from distsft.comm import dp_collectives
    from distsft.layouts import Layout, volumes
    from distsft.plan import model_shape

    cfg = typed_cfg()
    accum = 8 // (micro * world)
    v = volumes(cfg, model_shape(cfg), Layout(layout, shard=shard), micro, accum)
    per = {"reduce": 0.0, "gather": 0.0}
    for c in dp_collectives(layout, v, world, world, shard or world):
        if c.kind == "all_gather":
            per["gather"] += c.size / c.n
        else:
            per["reduce"] += c.size
    return per


def _close(got: dict, want: dict) -> bool:
    return all(abs(got[k] - want[k]) <= 0.05 * max(want[k], 1.0) for k in want)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_the_bytes_of_two_processes_are_the_plans(strategy, tmp_path):
    launch(2, tmp_path, f"parallel={strategy}", *STEPS, module="tests.integration.comm_entry")
    got, want = measured(tmp_path), predicted(strategy, 2)
    assert _close(got, want), (strategy, got, want)


@pytest.mark.parametrize("layout, parallel", [("hsdp", "fsdp"), ("zero3_hpz", "zero3")])
def test_the_bytes_of_hybrid_sharding_on_four_processes_are_the_plans(layout, parallel, tmp_path):
    launch(4, tmp_path, f"parallel={parallel}", "parallel.dp_shard_size=2", "trainer.micro_batch_size=2", *STEPS,
           module="tests.integration.comm_entry", timeout=900)
    got, want = measured(tmp_path), predicted(layout, 4, shard=2, micro=2)
    assert _close(got, want), (layout, got, want)
