"""Hydra multirun: `python -m distsft.train -m optim.lr=a,b` gives every job its own run dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import CPU_ENV

pytestmark = pytest.mark.slow  # tens of seconds each: out of the fast tier


def test_multirun_lr_sweep_has_one_run_dir_per_job(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distsft.train", "-m", "experiment=tiny_smoke",
                           "optim.lr=1e-3,3e-3", "logging.progress_bar=false", "trainer.save_every=0"],
                          cwd=tmp_path, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = sorted(d for d in (tmp_path / "outputs" / "tiny_smoke").iterdir() if d.is_dir())
    assert (tmp_path / "outputs" / "tiny_smoke" / "multirun.yaml").exists()
    # named by what the sweep varies, not by every override of the command line
    assert [d.name for d in dirs] == [f"optim.lr={lr}" for lr in ("0.001", "0.003")]
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    assert all(s["status"] == "finished" for s in summaries)
    assert summaries[0]["final_train_loss"] != summaries[1]["final_train_loss"]
    # each job's log holds only its own run
    assert all((d / "train.log").read_text().count("done: finished") == 1 for d in dirs)


def test_only_swept_keys_name_the_job_dirs():
    from distsft.config import _swept_keys

    argv = ["-m", "optim.lr=1e-3,3e-3", "data.train_files=[data/a.jsonl]", "trainer.max_steps=3",
            "peft.r=range(8,33,8)", "model=tiny,tiny_base"]
    assert _swept_keys(argv) == {"optim.lr", "peft.r", "model"}
