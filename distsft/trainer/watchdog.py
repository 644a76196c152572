"""Trainer (watchdog): a rank that stops making progress ends the job, fast, naming itself.

Every rank runs a small thread that publishes, every few seconds, a heartbeat to the process group's key-value
store (the launcher's, so a stopped rank cannot block it): its host, PID, beat counter, and the step and phase
the training thread last reported (``progress``: data, forward/backward, optimizer, eval, samples, checkpoint).
Each rank's thread also reads every rank's heartbeat, and judges with its own clock (no clock skew):

    lost    a rank's beat has not changed for trainer.hang_timeout seconds: the process is stopped (SIGSTOP, a
            frozen node) or gone
    stuck   a rank's step and phase have not changed for trainer.hang_timeout seconds while another rank is
            further on (it waits for this one in a collective): a hung filesystem, a dead network card

The first rank that is neither (the lowest) reports: one line on stderr (in the launcher's error file, and in
``output_dir/hang/report.txt``)
naming the rank, its host and PID, its step and phase, and how long it has been silent; stack dumps of every
rank go to ``output_dir/hang/`` (each live rank its own threads, with faulthandler; a lost rank on the same
host through ``py-spy dump --nonblocking``, which reads even a stopped process, where py-spy is installed). The
reporter then kills the lost ranks of its host and every live rank leaves with exit status ``HANG_EXIT``: the
launcher ends the rest, and ``slurm/train.sbatch`` requeues the job (seeing the report), which resumes from the
last complete checkpoint. Ranks that are all equally slow (a long checkpoint write, where the others wait at the
barrier) are not judged: only ``trainer.collective_timeout`` bounds that.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("distsft")
HANG_EXIT = 75  # EX_TEMPFAIL: the job may be retried
REPORT = "report.txt"  # output_dir/hang/report.txt: the reporter's line; slurm/train.sbatch requeues the job on it
PHASES = ("data", "forward/backward", "optimizer", "eval", "samples", "checkpoint")
_state = {"step": 0, "phase": "start", "changes": 0, "stopping": False}


def progress(phase: str, step: int | None = None) -> None:
    """What the training thread is doing now (a dictionary update: free to call in the step loop)."""
    if step is not None:
        _state["step"] = step
    _state["phase"] = phase
    _state["changes"] += 1


def stopping() -> None:
    """A stop was requested (SIGTERM, SIGUSR1: preemption.StopRequest). A rank lost now (its heartbeat stopped) is
    judged within a tenth of trainer.hang_timeout (at least 3 heartbeats): a survivor stuck in a collective with it
    (NCCL waits for the collective timeout) would otherwise hold the job for the launcher's whole SIGTERM grace."""
    _state["stopping"] = True


class Watchdog:
    """The heartbeat-and-judge thread of one rank (``start`` after the process group exists; ``stop`` at the end)."""

    def __init__(self, rank: int, world: int, timeout: float, run_dir: Path, store=None):
        self.rank, self.world, self.timeout, self.dir = rank, world, timeout, run_dir / "hang"
        self.store = store
        self.interval = max(0.5, min(5.0, timeout / 5))
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.seen: dict[int, dict] = {}  # rank -> last heartbeat, and when (our clock) its beat and progress moved
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distsft-watchdog", daemon=True)

    @classmethod
    def for_run(cls, acc, timeout: float, run_dir: Path) -> Watchdog | None:
        """A started watchdog when several processes train and ``timeout`` > 0, else None."""
        if timeout <= 0 or acc.num_processes <= 1:
            return None
        from torch.distributed import distributed_c10d

        dog = cls(acc.process_index, acc.num_processes, timeout, run_dir, distributed_c10d._get_default_store())
        dog.start()
        return dog

    def start(self) -> None:
        _state.update(step=0, phase="start", changes=0, stopping=False)
        self._beat(0)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=2 * self.interval)

    def _key(self, rank: int) -> str:
        return f"distsft/heartbeat/{rank}"

    def _beat(self, n: int) -> None:
        self.store.set(self._key(self.rank), json.dumps({"beat": n, "host": self.host, "pid": self.pid,
                                                         "step": _state["step"], "phase": _state["phase"],
                                                         "changes": _state["changes"]}))

    def _run(self) -> None:
        n = 0
        while not self.done.wait(self.interval):
            n += 1
            try:
                self._beat(n)
                verdict = self.judge(self._read(), time.monotonic())
            except Exception as e:  # noqa: BLE001  the store went away: the launcher is ending the job
                log.debug("watchdog: %s", e)
                return
            if verdict:
                self._end(*verdict)

    def _read(self) -> dict[int, dict]:
        keys = [self._key(r) for r in range(self.world)]
        if not self.store.check(keys):  # a rank that has not started yet
            return {}
        return {r: json.loads(v) for r, v in enumerate(self.store.multi_get(keys))}

    def judge(self, beats: dict[int, dict], now: float) -> tuple[list[int], list[int], dict] | None:
        """(lost ranks, stuck ranks, their heartbeats) once some rank has been silent past the timeout, else None."""
        for r, b in beats.items():
            old = self.seen.get(r)
            moved = old is None or old["beat"] != b["beat"]
            advanced = old is None or old["changes"] != b["changes"] or old["step"] != b["step"]
            self.seen[r] = {**b, "beat_at": now if moved else old["beat_at"],
                            "progress_at": now if advanced else old["progress_at"]}
        if len(self.seen) < self.world:
            return None
        limit = max(3 * self.interval, self.timeout / 10) if _state["stopping"] else self.timeout
        lost = [r for r, s in self.seen.items() if now - s["beat_at"] > min(limit, self.timeout)]
        front = max(_position(s) for s in self.seen.values())
        stuck = [r for r, s in self.seen.items() if r not in lost and now - s["progress_at"] > self.timeout
                 and _position(s) < front]
        return (lost, stuck, dict(self.seen)) if lost or stuck else None

    def _end(self, lost: list[int], stuck: list[int], seen: dict[int, dict]) -> None:
        now = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"rank_{self.rank}.txt", "w") as f:  # our own threads, where we are
            faulthandler.dump_traceback(f, all_threads=True)
        bad = lost + stuck
        reporter = min((r for r in range(self.world) if r not in bad), default=None)
        if reporter == self.rank:
            for r in lost:
                if seen[r]["host"] == self.host:
                    self._dump_other(r, seen[r]["pid"])
            lines = []
            for r in bad:
                s = seen[r]
                how = "stopped responding (no heartbeat)" if r in lost else "stopped making progress"
                since = now - (s["beat_at"] if r in lost else s["progress_at"])
                lines.append(f"rank {r} ({s['host']}, pid {s['pid']}) {how} at step {s['step']} in {s['phase']}, "
                             f"silent for {since:.0f} s")
            early = ", sooner for a lost rank once a stop was requested" if _state["stopping"] else ""
            message = (f"distsft: error: {'; '.join(lines)} (trainer.hang_timeout={self.timeout:g} s{early}); "
                       f"stack dumps in {self.dir}; ending the job (exit {HANG_EXIT}): resume from the last complete "
                       "checkpoint")
            print(message, file=sys.stderr, flush=True)
            (self.dir / REPORT).write_text(message + "\n")  # slurm/train.sbatch requeues the job on it
            tell_the_launcher(message)
            for r in lost:  # hung for good: nothing of theirs may write on
                if seen[r]["host"] == self.host:
                    _kill(seen[r]["pid"])
        else:
            time.sleep(2 * self.interval)  # the reporter speaks first
        logging.shutdown()
        os._exit(HANG_EXIT)

    def _dump_other(self, rank: int, pid: int) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        path = self.dir / f"rank_{rank}.txt"
        if not Path(spy).exists():
            path.write_text(f"rank {rank} (pid {pid}) did not respond; install py-spy for its stack "
                            "(pip install py-spy), or run: py-spy dump --nonblocking --pid <pid>\n")
            return
        try:
            out = subprocess.run([spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True,
                                 timeout=30, check=False)
            path.write_text(out.stdout + out.stderr)
        except (OSError, subprocess.SubprocessError) as e:
            path.write_text(f"py-spy dump of pid {pid} failed: {e}\n")


def _position(s: dict) -> tuple[int, int]:
    phase = s["phase"]
    return s["step"], PHASES.index(phase) if phase in PHASES else -1


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def die_with_launcher() -> None:
    """Under a launcher (torchrun, accelerate launch): this rank is killed when the launcher dies, so no rank
    outlives it and writes on into output_dir (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        return
    if os.getppid() == 1:  # the launcher died before we asked
        os._exit(HANG_EXIT)


def tell_the_launcher(message: str) -> None:
    """Under torchrun / accelerate launch, the launcher's failure summary shows the child's error file
    (torch.distributed.elastic's format): put the one line there instead of a pointer to tracebacks."""
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and not os.path.exists(path):
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                     "timestamp": str(int(time.time()))}}}, f)
