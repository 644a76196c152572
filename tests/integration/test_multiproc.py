"""Two CPU processes (accelerate launch, gloo) give the same per-step losses as one process with
doubled accumulation: the loss contract holds across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, launch, run_tiny

pytestmark = pytest.mark.multiproc
COMMON = ["trainer.max_steps=5", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
          "trainer.eval_every=5", "trainer.save_every=0", "logging.log_every=1"]


def test_two_processes_match_one(tmp_path):
    one = run_tiny(tmp_path / "one", *COMMON).summary  # 4 x 2 x 1
    two = launch(2, tmp_path / "two", *COMMON)  # 4 x 1 x 2
    assert one["batch"]["grad_accum"] == 2 and two["batch"] == {
        "micro_batch_size": 4, "grad_accum": 1, "world_size": 2, "global_batch_size": 8, "sp_size": 1}
    steps1, losses1 = zip(*one["train_loss_history"])
    steps2, losses2 = zip(*two["train_loss_history"])
    assert steps1 == steps2 == (1, 2, 3, 4, 5)
    # fp32 on CPU; the only difference is the order of the cross-rank sum (gloo all-reduce)
    for a, b in zip(losses1, losses2):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert two["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-5)
    assert two["tokens"] == one["tokens"] and two["supervised_tokens"] == one["supervised_tokens"]
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()
    # rank 0 speaks: one event file, one log
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_plain_num_processes_on_cpu_is_refused(tmp_path):
    """Without --multi_gpu Accelerate starts ONE process on a CPU machine; distsft says so."""
    accelerate_cli = str(Path(sys.executable).parent / "accelerate")  # exactly what a user types
    cmd = [accelerate_cli, "launch", "--num_processes", "2", "-m", "distsft.train",
           f"output_dir={tmp_path / 'x'}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "started a single process" in proc.stderr and "--multi_gpu" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_one_ranks_infinite_loss_is_skipped_by_every_rank(tmp_path):
    """Rank 1's loss alone is infinite on its 3rd micro-batch, with finite gradients (only the loss says so):
    the verdict must come from reduced quantities, so both ranks skip step 3 (fused AdamW decides on each rank's
    device: a rank-local verdict would let rank 0 step while rank 1 skips, and the replicas part)."""
    proc = launch(2, tmp_path, "trainer.max_steps=4", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
                  "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1", "logging.sample_every=0",
                  "export.enabled=false", module="tests.integration.nan_entry", expect_ok=False,
                  env={"DISTSFT_TEST_NAN_CALLS": "3", "DISTSFT_TEST_NAN_RANK": "1", "DISTSFT_TEST_NAN_KIND": "inf"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "finished" and s["skipped_steps"] == [3]
    for rank in (0, 1):  # each rank names the step it skipped
        assert f"rank {rank}: step 3 has a non-finite loss or gradient norm" in proc.stderr + proc.stdout


def test_a_failure_on_the_main_process_during_a_save_stops_every_rank_at_once_in_one_line(tmp_path):
    """The disk fills while the main process finishes checkpoint step_2 (its flush raises ENOSPC) and rank 1 waits
    for it in a collective. The failure is broadcast: both ranks stop at once (not after the collective timeout),
    the user reads one line naming the checkpoint and the OS error, and nothing half-written is trusted."""
    import time

    t0 = time.monotonic()
    proc = launch(2, tmp_path, "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=0",
                  "logging.sample_every=0", module="tests.integration.fault_entry", expect_ok=False, timeout=300,
                  env={"DISTSFT_TEST_FAULT": "save_oserror"})
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distsft: error:")]
    assert len(errors) == 1 and "saving checkpoint step_2 failed on the main process" in errors[0] \
        and "No space left on device" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("distsft: error:")[0], proc.stderr[-3000:]  # the ranks' own output
    assert elapsed < 120, elapsed
    ckpts = tmp_path / "checkpoints"
    assert not (ckpts / "step_2").exists() and not list(ckpts.glob("step_*/COMPLETE"))
