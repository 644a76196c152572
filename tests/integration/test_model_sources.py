"""The real loading paths: a local pretrained directory, bf16 autocast, the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_tiny, typed_cfg

SHORT = ["trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=0", "logging.log_every=1"]


def test_local_pretrained_directory(tmp_path):
    """model.name_or_path=<dir> with init=pretrained goes through from_pretrained and starts from those weights."""
    from distsft.model.load import load_model, load_tokenizer

    cfg = typed_cfg()
    src = tmp_path / "my-model"
    model = load_model(cfg.model, seed=123)
    model.save_pretrained(src)
    load_tokenizer(cfg.model).save_pretrained(src)
    res = run_tiny(tmp_path / "run", f"model.name_or_path={src}", "model.init=pretrained", "trainer.max_steps=1",
                   "optim.lr=0", "schedule.warmup_steps=0", "schedule.min_lr_ratio=1.0", *SHORT[1:])
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    for k in before:  # lr 0: the exported weights are the loaded ones, not a fresh random init
        assert torch.equal(before[k], after[k]), k
    assert res.summary["steps"] == 1


def test_bf16_autocast_trains(tmp_path):
    res = run_tiny(tmp_path, "trainer.precision=bf16", *SHORT)
    losses = [x for _, x in res.summary["train_loss_history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    # master weights stay fp32 under autocast; the export keeps them
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "final" / "model.safetensors").values())


def test_console_script(tmp_path):
    exe = Path(sys.executable).parent / "distsft-train"
    if not exe.exists():
        pytest.fail("console script distsft-train is not installed (pip install -e .)")
    proc = subprocess.run([str(exe), "experiment=tiny_smoke", f"output_dir={tmp_path}", "logging.progress_bar=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
