"""Ulysses sequence parallelism (parallel.sp_size, DeepSpeed's all-to-all attention) with CPU processes over gloo:
the same loss and gradients as one device, through the attention functions alone and through the whole trainer
(ZeRO-1/2/3, LoRA, gradient checkpointing, data parallel x sequence parallel), exact resume and an export that
loads with from_pretrained.

Tolerance 1e-5 (fp32): a slice changes only the order of sums (the all-to-alls move values, they add nothing).
LoRA runs use peft.dropout=0: dropout draws its masks per rank, so a different split draws other masks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CPU_ENV, ROOT, free_port, launch, run_tiny

pytestmark = pytest.mark.multiproc
STEPS = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=6", "logging.log_every=1"]
SP = ["parallel.sp_size=2"]


def same_losses(a: dict, b: dict, what: str) -> None:
    assert len(a["train_loss_history"]) == len(b["train_loss_history"]) > 0
    for (s1, x), (s2, y) in zip(a["train_loss_history"], b["train_loss_history"]):
        assert s1 == s2 and y == pytest.approx(x, rel=1e-5), (what, s1)
    assert b["final_eval_loss"] == pytest.approx(a["final_eval_loss"], rel=1e-5), what


def test_ulysses_attention_matches_one_device_and_no_all_to_all_does_not(tmp_path):
    """sdpa_packed and varlen, supervised-position head and full logits; documents straddle the split."""
    out = tmp_path / "sp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "tests.integration.sp_worker", str(out)],
                          cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert {(r["attention"], r["head"]) for r in results} == {(a, h) for a in ("sdpa_packed", "varlen")
                                                              for h in ("supervised", "full")}
    for r in results:
        assert r["sp_loss"] == pytest.approx(r["ref_loss"], rel=1e-5), r
        assert r["sp_grad_diff"] <= 1e-5, r
        # negative control: each rank attends only to its own slice
        assert abs(r["neg_loss"] - r["ref_loss"]) > 1e-4 and r["neg_grad_diff"] > 1e-2, r


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, plain DDP path: the same global batch (accumulation 2 instead of 2 slices)."""
    out = tmp_path_factory.mktemp("ref")
    return out, run_tiny(out, *STEPS).summary


def test_sp_under_zero2_matches_one_process_resumes_exactly_and_exports(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    ref_dir, ref = reference
    full = launch(2, tmp_path / "full", "parallel=zero2", *SP, *STEPS)
    assert full["batch"]["sp_size"] == 2 and full["batch"]["world_size"] == 2
    same_losses(ref, full, "zero2 sp=2")
    assert full["supervised_tokens"] == ref["supervised_tokens"] and full["tokens"] == ref["tokens"]  # counted once

    first = launch(2, tmp_path / "resumed", "parallel=zero2", *SP, *STEPS, "trainer.stop_after=3")
    assert first["status"] == "stopped" and first["steps"] == 3
    second = launch(2, tmp_path / "resumed", "parallel=zero2", *SP, *STEPS)
    assert second["status"] == "finished"
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")  # a plain HF model again
    assert exported.config._attn_implementation != "distsft_sdpa_packed"
    ref_weights = load_file(ref_dir / "final" / "model.safetensors")
    for name, p in exported.state_dict().items():
        if name in ref_weights:
            assert torch.allclose(p, ref_weights[name], atol=1e-5), name


def test_sp_under_zero3_with_lora_checkpointing_varlen_and_tiled_mlp_matches_one_process(tmp_path):
    """The 2-rank run also tiles its MLPs (model.tiled_mlp_shards=4; the 1-process run does not): the chunks'
    weight gradients accumulate inside one backward, which DeepSpeed must wait for (ds_grad_is_ready). It also
    offloads its checkpoints (model.offload_checkpoints=true): the whole ALST recipe on the sharded path."""
    common = ["parallel=zero3", "model=tiny_base", "peft=lora", "peft.dropout=0", "model.gradient_checkpointing=true",
              "model.attn_implementation=varlen", "trainer.max_steps=4", "trainer.eval_every=4",
              "logging.log_every=1"]
    one = launch(1, tmp_path / "one", *common)
    proc = launch(2, tmp_path / "sp", *common, *SP, "model.tiled_mlp_shards=4", "model.offload_checkpoints=true",
                  expect_ok=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "checkpoint offload: the inputs of 2 recomputed decoder layers" in proc.stdout + proc.stderr
    two = json.loads((tmp_path / "sp" / "summary.json").read_text())
    same_losses(one, two, "zero3 lora sp=2")
    a = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "sp" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_data_parallel_times_sequence_parallel_matches_one_process(reference, tmp_path):
    """4 processes: 2 replicas x 2 slices under ZeRO-1 (each replica its own rows, each rank its slice)."""
    _, ref = reference
    four = launch(4, tmp_path / "dp2sp2", "parallel=zero1", *SP, *STEPS, "trainer.save_every=0")
    assert four["batch"]["world_size"] == 4 and four["batch"]["grad_accum"] == 1
    same_losses(ref, four, "zero1 dp=2 sp=2")
