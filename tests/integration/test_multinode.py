"""Two "machines" x 1 process on loopback (accelerate launch --num_machines 2 --machine_rank r
--main_process_ip/--main_process_port): the same per-step losses as one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import CPU_ENV, ROOT, free_port, run_tiny

pytestmark = pytest.mark.multiproc
STEPS = ["trainer.max_steps=4", "trainer.eval_every=4", "trainer.save_every=0", "logging.log_every=1"]


def test_two_machines_on_loopback(tmp_path):
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--num_processes", "2", "--rdzv_backend", "static", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "distsft.train", f"output_dir={tmp_path / 'mn'}",
               "logging.progress_bar=false", *STEPS]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=CPU_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    two = json.loads((tmp_path / "mn" / "summary.json").read_text())
    one = run_tiny(tmp_path / "one", *STEPS).summary
    assert two["batch"]["world_size"] == 2
    for (_, a), (_, b) in zip(one["train_loss_history"], two["train_loss_history"]):
        assert b == pytest.approx(a, rel=1e-5)
