"""Trainer stage 8: stopping on request (preemption) without losing work.

A stop is requested by SIGUSR1 or SIGTERM on any process (SLURM's ``--signal``, a scheduler's
termination notice) or by a file ``output_dir/STOP`` (what ``slurm/train.sbatch`` writes when its
batch shell gets the signal). The request travels with the per-step token-count all-reduce, so all
ranks see it at the same step (read one step late when fused AdamW decides the update on the
device: see ``guards.StepVerdicts``): they finish that optimizer step, write a complete checkpoint
and exit; ``trainer.resume=auto`` continues from there.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

log = logging.getLogger("distsft")
STOP_FILE = "STOP"


class StopRequest:
    def __init__(self, output_dir: Path, is_main: bool):
        self.flag = False
        self.file = output_dir / STOP_FILE
        self.is_main = is_main
        if is_main and self.file.exists():  # a stale request from the run we are resuming
            self.file.unlink()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def local(self) -> float:
        """1.0 if this process wants to stop (the main process also polls the stop file)."""
        return 1.0 if self.flag or (self.is_main and self.file.exists()) else 0.0

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
