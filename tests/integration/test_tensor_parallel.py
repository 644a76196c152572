"""Tensor parallelism (parallel.tp_size) over FSDP2 with CPU processes over gloo: the per-step losses, the eval loss
and the final (exported, whole) weights of one process, through a stop and a resume.

- 2 processes, tp=2 (one data-parallel replica) for steps 1-3, resumed under plain FSDP (tp=1) for steps 4-6:
  torch.distributed.checkpoint reshards the tensor-parallel DTensors into FSDP's shards;
- 4 processes, tp=2 x 2 data-parallel ranks, stopped after step 3 and resumed as it was (its collectives' bytes,
  profiled, are the plan's within 5%);
- 4 processes, tp=2 x sp=2 (Ulysses' all-to-all over the heads a tensor-parallel rank holds), and 2 processes of
  FSDP2 with sp=2 alone (DeepSpeed's Ulysses module on FSDP2's mesh, no DeepSpeed engine);
- the negative control: the two ranks of a tp group take different rows (one takes its micro-batches in reverse
  order); the losses part from the reference.

The weights are held to a relative error of 2e-5 per tensor and 1e-4 per element: TP splits the matmuls' sums over
the ranks (row-wise layers add partial products), and Adam's first steps turn that rounding into up to ~2e-5 on
weights whose gradient is near 0. (Measured 2026-12-08: losses equal to 1e-6, weights 6e-6 (tp), 9e-6 (tp x sp)
relative per tensor, 2.2e-5 at most per element; each launch takes about 10 s on 2 cores.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import launch
from tests.helpers import EQUIVALENCE_STEPS as STEPS
from tests.helpers import reference_run, same_losses

pytestmark = pytest.mark.multiproc
TP = ["parallel=fsdp", "parallel.tp_size=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("ref"))


def _same_weights(out, weights: dict) -> None:
    final = load_file(out / "final" / "model.safetensors")  # whole weights, gathered from the tp and dp shards
    assert final.keys() == weights.keys()
    for k, want in weights.items():
        assert ((final[k] - want).norm() / want.norm()).item() < 2e-5, k
        torch.testing.assert_close(final[k], want, rtol=0, atol=1e-4)


def test_tp2_matches_one_process_and_resumes_under_plain_fsdp(reference, tmp_path):
    ref, weights = reference
    first = launch(2, tmp_path, *TP, *STEPS, "trainer.stop_after=3")
    assert first["status"] == "stopped"  # (the resumed run's history holds steps 1-3 from the checkpoint)
    log = (tmp_path / "train.log").read_text()
    assert "tensor parallel over groups of 2 ranks (parallel.tp_size=2), 1 data-parallel replica" in log
    assert "data-parallel 1 (world_size 2 / tensor-parallel 2)" in log
    second = launch(2, tmp_path, "parallel=fsdp", *STEPS)
    log = (tmp_path / "train.log").read_text()
    assert "written by 2 processes under fsdp tp_size=2, loaded by 2 under fsdp" in log
    assert second["status"] == "finished" and same_losses(second, ref), (second["train_loss_history"], ref)
    assert second["eval_loss_history"][-1][1] == pytest.approx(ref["eval_loss_history"][-1][1], rel=1e-6)
    _same_weights(tmp_path, weights)


def test_tp_times_dp_matches_one_process_through_a_resume(reference, tmp_path):
    ref, weights = reference
    first = launch(4, tmp_path, *TP, *STEPS, "trainer.stop_after=3", timeout=900)
    assert first["status"] == "stopped"
    # the resumed run (steps 4-6) is profiled in steps 5-6: its collectives' bytes are the plan's (comm_entry)
    second = launch(4, tmp_path, *TP, *STEPS, timeout=900, module="tests.integration.comm_entry",
                    env={"DISTSFT_TEST_PROFILE": "2,3"})
    log = (tmp_path / "train.log").read_text()
    assert "2 data-parallel replicas" in log and "resumed from" in log
    assert second["status"] == "finished" and same_losses(second, ref), (second["train_loss_history"], ref)
    from tests.integration.comm_entry import close_enough, head_rows, measured, predicted

    got, want = measured(tmp_path), predicted("fsdp", 4, micro=2, tp=2, rows=head_rows(tmp_path))
    assert close_enough(got, want), (got, want)
    _same_weights(tmp_path, weights)
    assert second["supervised_tokens"] == ref["supervised_tokens"]  # a tp group's tokens counted once


@pytest.mark.parametrize("n, layout, says", [
    (4, TP, "data-parallel 1 (world_size 4 / sequence-parallel 2 x tensor-parallel 2)"),
    (2, ["parallel=fsdp"], "data-parallel 1 (world_size 2 / sequence-parallel 2)"),
], ids=["tp2_sp2", "fsdp_sp2"])
def test_sequence_parallelism_under_fsdp_matches_one_process(n, layout, says, reference, tmp_path):
    ref, weights = reference
    summary = launch(n, tmp_path, *layout, "parallel.sp_size=2", *STEPS, timeout=900)
    log = (tmp_path / "train.log").read_text()
    assert says in log and "Ulysses sequence parallel over groups of 2 ranks (parallel.sp_size=2)" in log
    assert same_losses(summary, ref), (summary["train_loss_history"], ref)
    assert summary["eval_loss_history"][-1][1] == pytest.approx(ref["eval_loss_history"][-1][1], rel=1e-6)
    _same_weights(tmp_path, weights)


def test_tp_ranks_on_different_rows_part_from_one_process(reference, tmp_path):
    ref, _ = reference
    launch(2, tmp_path, *TP, *STEPS, module="tests.integration.fault_entry",
           env={"DISTSFT_TEST_FAULT": "tp_rows_apart"})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not same_losses(summary, ref, rel=1e-3)
