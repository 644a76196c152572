"""Plan: numbers on a known config, the CLI, an MoE's active parameters, and the longest row for a budget
(the memory formulas themselves: test_memory.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distsft.memory import GIB, memory_estimate
from distsft.plan import make_plan
from tests.conftest import ROOT, typed_cfg


def test_plan_numbers_on_the_embedded_default():
    p = make_plan(typed_cfg(), world_size=1)
    d = p["data"]
    assert p["batch"] == {"micro_batch_size": 4, "grad_accum": 2, "world_size": 1, "global_batch_size": 8, "sp_size": 1,
                          "tp_size": 1}
    assert p["steps_per_epoch"] == d["sequences"] // 8
    assert p["total_steps"] == 4 * p["steps_per_epoch"]  # the tiny recipe: 4 epochs
    assert p["warmup_steps"] == int(0.05 * p["total_steps"])
    assert p["example_views"] == 4 * d["kept"]
    assert p["lr_curve"][0][0] == 0 and p["lr_curve"][-1][0] == 100
    assert p["lr_curve"][-1][2] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(
        __import__("math").pi * (p["total_steps"] - 1 - p["warmup_steps"]) / (p["total_steps"] - p["warmup_steps"])))))
    two = make_plan(typed_cfg(), world_size=2)
    assert two["batch"]["grad_accum"] == 1 and two["total_steps"] == p["total_steps"]

def test_plan_cli(tmp_path):
    png = tmp_path / "lr.png"
    proc = subprocess.run([sys.executable, "-m", "distsft.plan", "parallel=zero2", "plan.world_size=2",
                           f"plan.lr_plot={png}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("world_size 2 = global_batch_size 8" in proc.stdout
            and "memory per GPU on CUDA (estimate, kernels=" in proc.stdout)
    assert f"LR curve: {png}" in proc.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "activation checkpointing (memory, extra compute): off" in proc.stdout


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tokenizer):
    """A tiny Qwen3-MoE config (4 experts, top 2) beside the embedded tokenizer: what the plan reads."""
    from tests.unit.test_moe_experts import tiny

    path = tmp_path_factory.mktemp("tiny-moe")
    tiny("qwen3_moe").config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_plan_counts_the_active_parameters_of_an_moe(tiny_moe_dir, peft):
    """FLOPs per token (train/mfu's count) use the parameters a token passes through: for an MoE the non-expert
    weights and top_k/num_experts of the experts; the plan prints both counts (a dense model: one)."""
    from distsft.plan import render
    from tests.unit.test_moe_experts import H, V, hand_count

    overrides = [f"model.name_or_path={tiny_moe_dir}", "model.init=config"]
    p = make_plan(typed_cfg(*overrides, *([f"peft={peft}", "peft.dropout=0"] if peft != "none" else [])), 1)
    counts, (total, active) = p["parameters"], hand_count("qwen3_moe")
    embedding = V * H  # a lookup, not a matmul (untied)
    if peft == "none":
        assert counts == {"total": total, "trainable": total, "active": active}
        assert p["flops_per_token"] == 6 * (active - embedding)  # not 6 x (all parameters - embedding)
    else:  # a frozen base: 4N; the adapters of the experts count top_k/num_experts of theirs too
        adapters = counts["trainable"]
        assert counts["total"] == total + adapters and active < counts["active"] < active + adapters
        assert p["flops_per_token"] == 4 * (counts["active"] - embedding)
    assert f"{counts['active']:,} active per token" in render(p)
    dense = make_plan(typed_cfg(), 1)
    assert dense["parameters"]["active"] == dense["parameters"]["total"] and "active per token" not in render(dense)


def test_longest_sequence_fits_the_budget_and_one_step_longer_does_not(tmp_path):
    """distsft.plan answers "how long can I go" for a stated memory budget (the tiny model, 20 MiB): for each
    saver the estimate at the answer fits 85% of it and 256 tokens more do not; the savers only lengthen it,
    and sequence parallelism over 2 ranks more so (with a kernel whose memory is linear in the row)."""
    from dataclasses import replace

    from distsft.memory import HEADROOM, SAVERS
    from distsft.plan import model_shape

    budget = 0.02 * GIB
    p = make_plan(typed_cfg("plan.gpu_memory_gib=0.02"), world_size=1)
    cfg = typed_cfg("plan.gpu_memory_gib=0.02")
    shape = model_shape(cfg)
    lengths = []
    for o, (_, overrides) in zip(p["longest"], SAVERS):
        c = replace(cfg, model=replace(cfg.model, **overrides))

        def memory(t):
            return memory_estimate(replace(c, data=replace(c.data, max_seq_len=t)), shape, 1, 1)["total"]

        t = o["max_seq_len"]
        assert t > 0 and t % 256 == 0 and memory(t) <= HEADROOM * budget < memory(t + 256), o
        assert o["seconds_per_row"] > 0 and o["tokens_per_s_per_gpu"] > 0
        lengths.append(t)
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]
    # a linear-memory kernel: sdpa's [T, T] mask is the whole row's on every rank of the group
    linear = ("plan.gpu_memory_gib=0.02", "model.attn_implementation=varlen")
    one = make_plan(typed_cfg(*linear), world_size=1)["longest"][0]["max_seq_len"]
    sp = make_plan(typed_cfg(*linear, "parallel=zero2", "parallel.sp_size=2"), world_size=2)
    assert sp["batch"]["sp_size"] == 2 and sp["longest"][0]["max_seq_len"] > one >= lengths[0]
    assert "longest data.max_seq_len in 85% of 0.02 GiB" in __import__("distsft.plan", fromlist=["render"]).render(p)


def test_a_run_at_the_plans_longest_row_fits_its_budget(tmp_path):
    """The plan's answer, trained: a one-step run at the longest row that "+ checkpointing" gives for 0.1 GiB
    allocates at most 85% of it (every tensor the run allocates, weights and optimizer state included, as the
    CPU allocator's events count them), with sdpa (a [T, T] mask per layer) and with eager (scores per layer,
    so a much shorter row). Negative control: eager at sdpa's length allocates more than the whole budget."""
    from distsft.memory import HEADROOM
    from tests.conftest import peak_allocated, run_tiny

    budget = 0.1 * GIB

    def longest(impl):
        plan = make_plan(typed_cfg("plan.gpu_memory_gib=0.1", f"model.attn_implementation={impl}"), world_size=1)
        row = plan["longest"][1]
        assert row["option"] == "+ checkpointing" and plan["attention"] == impl
        return row["max_seq_len"]

    def peak(impl, length):
        overrides = (f"data.max_seq_len={length}", f"model.attn_implementation={impl}",
                     "model.gradient_checkpointing=true", "trainer.max_steps=1", "trainer.eval_every=0",
                     "export.enabled=false", "trainer.global_batch_size=1", "trainer.micro_batch_size=1")
        out = tmp_path / f"{impl}{length}"
        bytes_, result = peak_allocated(lambda: run_tiny(out, *overrides))
        assert result.summary["status"] == "finished"
        return bytes_

    sdpa, eager = longest("sdpa"), longest("eager")
    assert eager < sdpa / 2, (eager, sdpa)  # eager's scores are H x (4 + 4) bytes per [T, T] element and layer
    assert peak("sdpa", sdpa) <= HEADROOM * budget
    assert peak("eager", eager) <= HEADROOM * budget
    assert peak("eager", sdpa) > budget
