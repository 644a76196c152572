"""Trainer: stopping on request (preemption) without losing work.

A stop is requested by SIGUSR1 or SIGTERM on any process (SLURM's ``--signal``, a scheduler's
termination notice) or by a file ``output_dir/STOP`` (what ``slurm/train.sbatch`` writes when its
batch shell gets the signal). The request travels with the per-step token-count all-reduce, so all
ranks see it at the same step (read one step late when fused AdamW decides the update on the
device: see ``guards.StepVerdicts``): they finish that optimizer step, write a complete checkpoint
and exit; ``trainer.resume=auto`` continues from there.

Under ``accelerate launch`` / ``torchrun`` the SIGTERM reaches the launcher's agent, which passes it on to the ranks
and kills them ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds later (30 by default). ``SaveClock`` compares every
checkpoint's duration with that grace and says, once, when a preemption's checkpoint would not fit in it;
``slurm/train.sbatch`` gives the agent ``DISTSFT_PREEMPT_GRACE`` seconds (default 600).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger("distsft")
STOP_FILE = "STOP"


class StopRequest:
    """The stop request of this process. Python runs signal handlers in the main thread only, between bytecodes: a
    main thread stuck in a collective (its peer lost) would not hear of the signal until the collective returns. The
    signals are therefore also read from Python's wakeup fd (written by the C-level handler at once, whatever the
    main thread does) by a small thread, which raises the flag and tells the watchdog."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, output_dir: Path, is_main: bool):
        self.flag = False
        self.file = output_dir / STOP_FILE
        self.is_main = is_main
        self.wakeup: tuple[int, int] | None = None
        if is_main and self.file.exists():  # a stale request from the run we are resuming
            self.file.unlink()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handler)
            self._listen()

    def _listen(self) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            os.close(r)
            os.close(w)
            return
        self.wakeup = (r, w)
        threading.Thread(target=self._read, args=(r,), name="distsft-stop-signals", daemon=True).start()

    def _read(self, fd: int) -> None:
        while data := os.read(fd, 64):  # b"" once restore() closed the write end
            if any(b in self.SIGNALS for b in data):
                self._handler(None, None)
        os.close(fd)

    def _handler(self, signum, frame) -> None:
        from .watchdog import stopping

        self.flag = True
        stopping()  # a lost rank is now judged within seconds, not at trainer.hang_timeout

    def local(self) -> float:
        """1.0 if this process wants to stop (the main process also polls the stop file)."""
        return 1.0 if self.flag or (self.is_main and self.file.exists()) else 0.0

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            if self.wakeup is not None:
                signal.set_wakeup_fd(-1)
                os.close(self.wakeup[1])
                self.wakeup = None


def launcher_grace() -> float | None:
    """Seconds the launcher's agent leaves the ranks between passing on a SIGTERM and killing them (None: no agent,
    e.g. a plain ``python -m distsft.train``)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))


class SaveClock:
    """Warns once (main process) when a checkpoint took longer than the launcher's SIGTERM grace."""

    def __init__(self, is_main: bool):
        self.grace, self.warned = (launcher_grace() if is_main else None), False

    def saved(self, name: str, seconds: float) -> None:
        if self.grace is None or self.warned or seconds <= self.grace:
            return
        self.warned = True
        log.warning("checkpoint %s took %.0f s, longer than the %.0f s the launcher leaves the ranks between a SIGTERM "
                    "and killing them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): a preemption would lose the steps since the "
                    "previous checkpoint. Launch with TORCH_ELASTIC_SHUTDOWN_TIMEOUT=%d or more (slurm/train.sbatch: "
                    "DISTSFT_PREEMPT_GRACE), and give the scheduler the same margin (SLURM: GraceTime, KillWait)",
                    name, seconds, self.grace, 2 * seconds + 30)
