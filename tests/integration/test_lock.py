"""One trainer per output_dir: a second run on a directory a live run holds stops naming the holder and
writes nothing; the lock of a killed run is taken over."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import pytest

from distsft.config import ConfigError
from tests.conftest import CPU_ENV, ROOT, run_tiny


def wait_for_holder(lock, proc, timeout=120.0) -> dict:
    """The lock's holder, once the run has also set up its directory (it takes the lock first, then writes
    config.yaml and opens train.log: on a busy machine the lock can be read before the config is there)."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if lock.exists() and lock.read_text().strip() and (lock.parent / "train.log").exists():
            return json.loads(lock.read_text())
        time.sleep(0.2)
    pytest.fail("the first run never took the lock and wrote its config")


def test_a_second_run_is_refused_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "distsft.train", f"output_dir={out}", "logging.progress_bar=false",
                              "trainer.max_steps=100000", "trainer.save_every=0", "trainer.eval_every=0",
                              "logging.sample_every=0"], cwd=ROOT, env=CPU_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for_holder(out / ".distsft.lock", first)
        assert holder["pid"] == first.pid
        config = (out / "config.yaml").read_text()
        with pytest.raises(ConfigError, match=rf"output_dir={out} is in use by another distsft run \(host .+, "
                                              rf"PID {first.pid}, since"):
            run_tiny(out, "trainer.max_steps=2", "trainer.resume=never")
        assert (out / "config.yaml").read_text() == config  # the refused run wrote nothing (it would say max_steps 2)
        assert "max_steps: 100000" in config and not (out / "summary.json").exists()
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        first.wait()
    caplog.set_level(logging.INFO)
    res = run_tiny(out, "trainer.max_steps=2", "trainer.resume=never", "trainer.eval_every=0")
    assert res.summary["status"] == "finished"
    assert f"took over {out / '.distsft.lock'} left by a run that is no longer running" in caplog.text
    assert f"PID {first.pid}" in caplog.text
    assert (out / ".distsft.lock").read_text() == ""  # released at the end
