"""Every user-caused failure is one clear line naming what, where and what to do; the exit status is 2,
there is no traceback (unless DISTSFT_DEBUG=1), and output_dir is untouched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distsft.config import ConfigError
from tests.conftest import CPU_ENV, ROOT, launch, run_tiny, typed_cfg


@pytest.mark.parametrize("override,expect", [
    ("optim.lr=-1e-3", r"optim.lr=-0.001: expected a learning rate in \[0, 1\)"),
    ("optim.beta2=1.0", r"optim.beta2=1.0: expected in \[0, 1\)"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1: expected in \[0, 1\)"),
    ("trainer.max_grad_norm=-1", r"trainer.max_grad_norm=-1.0: expected >= 0"),
    ("schedule.warmup_steps=-5", r"schedule.warmup_steps=-5: expected >= 0 or null"),
    ("peft.dropout=1.5", r"peft.dropout=1.5: expected in \[0, 1\)"),
    ("peft.r=0", r"peft.r=0: expected >= 1"),
    ("trainer.save_every=-1", r"trainer.save_every=-1: expected >= 0"),
    ("logging.log_every=0", r"logging.log_every=0: expected >= 1"),
    ("trainer.spike_factor=0.5", r"trainer.spike_factor=0.5: expected 0 \(off\) or > 1"),
])
def test_numeric_ranges_are_checked_at_compose_time(override, expect):
    with pytest.raises(ConfigError, match=expect):
        typed_cfg(override)


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("mine")
    with pytest.raises(ConfigError, match=rf"output_dir={f} exists and is not a directory"):
        run_tiny(f, "trainer.max_steps=1")
    assert f.read_text() == "mine"


def test_missing_local_model_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name_or_path=/nonexistent/model: no such directory"):
        run_tiny(tmp_path / "out", "model.name_or_path=/nonexistent/model", "trainer.max_steps=1")
    assert not (tmp_path / "out").exists()


def test_empty_weights_file_is_named(tmp_path):
    from distsft.model.load import load_model, load_tokenizer

    src = tmp_path / "model"
    load_model(typed_cfg().model, seed=0).save_pretrained(src)
    load_tokenizer(typed_cfg().model).save_pretrained(src)
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"model.name_or_path: {src / 'model.safetensors'} is empty \(0 bytes\)"):
        run_tiny(tmp_path / "out", f"model.name_or_path={src}", "model.init=pretrained", "trainer.max_steps=1")
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")  # a broken header
    with pytest.raises(ConfigError, match=r"is not a readable safetensors file"):
        run_tiny(tmp_path / "out", f"model.name_or_path={src}", "model.init=pretrained", "trainer.max_steps=1")
    assert not (tmp_path / "out").exists()


def test_resume_target_missing_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.resume=/nonexistent: not a complete checkpoint"):
        run_tiny(tmp_path / "out", "trainer.resume=/nonexistent", "trainer.max_steps=1")
    assert not (tmp_path / "out").exists()


def test_the_entry_point_prints_one_line_and_exits_2(tmp_path):
    cmd = [sys.executable, "-m", "distsft.train", f"output_dir={tmp_path / 'out'}", "optim.lr=-1e-3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "distsft: error: optim.lr=-0.001: expected a learning rate in [0, 1)"
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    debug = subprocess.run(cmd, cwd=ROOT, env={**CPU_ENV, "DISTSFT_DEBUG": "1", "HYDRA_FULL_ERROR": "1"},
                           capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.multiproc
def test_under_a_launcher_the_error_is_printed_once(tmp_path):
    proc = launch(2, tmp_path / "out", "optim.lr=-1e-3", expect_ok=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("distsft: error: optim.lr=-0.001")]
    assert len(lines) == 1  # the main process speaks, not every rank
    # and the launcher's failure summary shows it as the root cause (torchelastic's error file)
    assert "traceback : distsft: error: optim.lr=-0.001: expected a learning rate in [0, 1)" in out
    assert not (tmp_path / "out").exists()
