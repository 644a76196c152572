"""Two "machines" x 1 process on loopback (accelerate launch --num_machines 2 --machine_rank r
--main_process_ip/--main_process_port): the same per-step losses as one process; the token cache is prepared once
for the job where both machines see it (a shared filesystem), once per machine where each has its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import CPU_ENV, ROOT, free_port, run_tiny

pytestmark = pytest.mark.multiproc
STEPS = ["trainer.max_steps=4", "trainer.eval_every=4", "trainer.save_every=0", "logging.log_every=1"]


@pytest.mark.parametrize("shared", [True, False])
def test_two_machines_on_loopback(tmp_path, shared):
    port = free_port()
    procs = []
    caches = [tmp_path / "cache"] * 2 if shared else [tmp_path / "cache0", tmp_path / "cache1"]
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--num_processes", "2", "--rdzv_backend", "static", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "distsft.train", f"output_dir={tmp_path / 'mn'}",
               "logging.progress_bar=false", *STEPS]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**CPU_ENV, "DISTSFT_CACHE": str(caches[rank])},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    two = json.loads((tmp_path / "mn" / "summary.json").read_text())
    one = run_tiny(tmp_path / "one", *STEPS).summary
    assert two["batch"]["world_size"] == 2
    log = outs[0]  # the main process's console (data are prepared before output_dir/train.log opens)
    entries = [p for c in set(caches) for p in (c / "tokenized").iterdir()]
    if shared:  # one entry, built by the main process (machine 1's process waited for it), no probe left
        assert "every node sees it (a shared filesystem): prepared once, by the main process" in log
        assert len(entries) == 1 and "tokenized data from cache" not in log
    else:
        assert "node-local: the first process of each node prepares its own copy" in log and len(entries) == 2
    assert not list(tmp_path.glob("cache*/tokenized/.distsft-probe-*"))
    for (_, a), (_, b) in zip(one["train_loss_history"], two["train_loss_history"]):
        assert b == pytest.approx(a, rel=1e-5)
