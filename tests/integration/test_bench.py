"""bench/throughput.py on CPU at toy size: the harness counts what the systems compute, and they agree
on the first loss (the GPU figures in bench/README.md come from the same code); bench/long_context.py likewise."""

from __future__ import annotations

import math
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # tens of seconds each: out of the fast tier


def test_throughput_harness_counts_tokens_and_losses_agree(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import throughput
    finally:
        sys.path.remove(str(ROOT / "bench"))
    results = throughput.main(["--model", "tiny", "--data", "toy", "--warmup", "1", "--steps", "2", "--device", "cpu",
                               "--systems", "distsft,distsft_loop,hf", "--out", str(tmp_path), "--timeout", "300"])
    by = {r["system"]: r for r in results}
    assert set(by) == {"distsft", "distsft_loop", "hf"} and not any("error" in r for r in results), results
    assert by["distsft_loop"]["losses"] == by["distsft"]["losses"]  # the whole loop runs the same steps
    d, hf = by["distsft"], by["hf"]
    for r in (d, hf):
        assert abs(r["first_loss"] - math.log(640)) < 0.1  # random init: ~ln(vocab)
        assert r["tokens_per_s"] > 0 and r["steps"] == 2
    assert len(d["losses"]) == 3 and len(hf["losses"]) == 2  # peers log the first and last step only
    assert d["real_per_computed"] > 0.9 > hf["real_per_computed"]  # packed rows vs padded micro-batches
    assert abs(hf["examples_per_step"] - d["examples_per_step"]) <= 4  # peers get distsft's examples per step
    assert d["estimate_gib"]["total"] > 0 and (tmp_path / "throughput_tiny_toy.json").exists()


def test_long_context_harness_trains_each_saver_alike_and_starts_from_the_plans_longest(tmp_path):
    """bench/long_context.py on CPU with the tiny model: the savers give the same first loss (they change memory,
    not numerics), the offload row moves each layer's input, and --longest starts at distsft.plan's answer."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import long_context
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = long_context.main(["--model", "tiny", "--device", "cpu", "--lengths", "128", "--savers", "0,3",
                              "--warmup", "0", "--steps", "1", "--out", str(tmp_path), "--timeout", "300"])
    assert ([r["saver"] for r in rows] == ["as configured", "+ checkpoint offload"]
            and not any("error" in r for r in rows))
    plain, offload = rows
    assert abs(plain["first_loss"] - math.log(640)) < 0.1 and offload["first_loss"] == plain["first_loss"]
    assert plain["offloaded_gib_per_step"] == 0 and offload["offloaded_gib_per_step"] * 2**30 == 2 * 128 * 64 * 4
    from distsft.plan import make_plan
    from tests.conftest import typed_cfg

    a = long_context.parse(["--model", "tiny", "--device", "cpu", "--longest", "--gpu-memory-gib", "0.02"])
    planned = make_plan(typed_cfg("plan.gpu_memory_gib=0.02"), 1)["longest"]
    assert [long_context.predicted_longest(a, i) for i in range(4)] == [o["max_seq_len"] for o in planned]
