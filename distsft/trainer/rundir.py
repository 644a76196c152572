"""Trainer (run directory): output_dir's lock, its config.yaml and train.log, the removal of unfinished checkpoints,
and the checkpoint a run resumes from."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from ..config import Config
from . import checkpoint
from .collective import main_decides
from .lock import RunLock
from .reshape import route

log = logging.getLogger("distsft")


class _RunLog(logging.FileHandler):
    """output_dir/train.log; removed again at the end of run() (a sweep runs several in one process)."""


def close_run_log() -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _RunLog)]:
        root.removeHandler(h)
        h.close()


def setup_run_dir(acc, out: Path, resolved: dict) -> None:
    def setup():
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), out / "config.yaml")
        close_run_log()
        handler = _RunLog(out / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        logging.getLogger().addHandler(handler)
        # a save that crashed (before or after its rename, without COMPLETE): nothing may trust it
        for gone in checkpoint.remove_incomplete(out / "checkpoints"):
            log.warning("removed %s: an unfinished checkpoint (no %s marker) of an earlier run", gone,
                        checkpoint.MARKER)

    main_decides(acc, setup, f"setting up {out}")  # (its broadcast is the barrier: the run directory exists)
    # Accelerate logs every file of every checkpoint at INFO; keep the run log readable
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def locked(acc, out: Path):
    """Hold output_dir's run lock (taken by the main process; every rank stops if another run holds it)."""
    lock = RunLock(out) if acc.is_main_process else None
    main_decides(acc, lambda: lock.acquire(), f"taking the run lock of {out}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def resume_target(acc, cfg: Config, out: Path, resolved: dict, fingerprint: str) -> Path | None:
    """The intact checkpoint to resume from (None: start fresh), checked for compatibility."""
    # every rank checks its share of the checkpoints' files and all reach the same answer
    ckpt = checkpoint.find_resume(cfg.trainer.resume, out / "checkpoints", acc)
    if ckpt is not None:
        checkpoint.check_compatible(ckpt, resolved, fingerprint, cfg.trainer.resume_force)
        route(ckpt, cfg.parallel, acc.num_processes)  # a change of strategy the engines cannot load: refused now
    return ckpt


def write_skipped(acc, out: Path, skipped) -> None:
    """output_dir/skipped_rows.jsonl (main process; collective: a failed write stops every rank in one line)."""
    def write():
        with (out / "skipped_rows.jsonl").open("w") as f:
            for row in skipped.rows:
                f.write(json.dumps(row) + "\n")

    main_decides(acc, write, f"writing {out / 'skipped_rows.jsonl'}")
