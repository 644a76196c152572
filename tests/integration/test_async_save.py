"""trainer.async_save in one process: a checkpoint staged in host memory and written behind the loop is the same
checkpoint a synchronous save writes, and a background write that meets a full disk (a real, small tmpfs) ends the
run in one line naming the path, the bytes still to write and the bytes free, with the earlier checkpoint intact.
Kill -9 mid-write under ddp/ZeRO-2/ZeRO-3 with 2 processes: tests/integration/test_deepspeed.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distsft.trainer.checkpoint import complete_checkpoints, damage
from distsft.trainer.guards import TrainingError
from tests.conftest import run_tiny

STEPS = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=0", "logging.log_every=1",
         "logging.sample_every=0"]


def test_async_checkpoints_equal_synchronous_ones(tmp_path, caplog):
    """The same final weights, the same files in every checkpoint (each intact against its manifest), resumable,
    and the stage in host memory given back."""
    sync = run_tiny(tmp_path / "sync", *STEPS).summary
    before = set(Path("/dev/shm").glob("distsft-*"))
    caplog.set_level("INFO", logger="distsft")
    run_tiny(tmp_path / "async", *STEPS, "trainer.async_save=true", "trainer.stop_after=3")
    resumed = run_tiny(tmp_path / "async", *STEPS, "trainer.async_save=true").summary
    assert resumed["train_loss_history"] == sync["train_loss_history"]
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("sync", "async"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for (n1, c1), (n2, c2) in zip(complete_checkpoints(tmp_path / "sync" / "checkpoints"),
                                  complete_checkpoints(tmp_path / "async" / "checkpoints")):
        files = json.loads((c2 / "COMPLETE").read_text())["files"]
        assert n1 == n2 and damage(c2) == [] and set(files) == set(json.loads((c1 / "COMPLETE").read_text())["files"])
        assert not (c2 / ".parts").exists()
    log = caplog.text
    assert "checkpoint step_6 staged in host memory" in log and "step_6 complete (" in log
    assert set(Path("/dev/shm").glob("distsft-*")) <= before  # this run's stage is gone


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for one checkpoint of the tiny model (2.2 MB), not two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the development machines run as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_a_background_write_ends_the_run_in_one_line(small_disk):
    with pytest.raises(TrainingError) as e:
        run_tiny(small_disk / "run", *STEPS, "trainer.async_save=true", "export.enabled=false", "logging.plot=false")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("writing checkpoint step_6 in the background failed on rank 0: "
                                              "[Errno 28] No space left on device"), msg
    assert str(small_disk / "run" / "checkpoints" / ".step_6.tmp") in msg and "MB free there" in msg
    ckpts = small_disk / "run" / "checkpoints"
    assert [n for n, _ in complete_checkpoints(ckpts)] == [3] and damage(ckpts / "step_3") == []
    assert not (ckpts / "step_6").exists()  # the partial copy is never made complete
