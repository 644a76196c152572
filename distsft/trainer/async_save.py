"""Trainer (async save): checkpoints that do not stop training (``trainer.async_save``).

    training thread   save_state into this rank's stage (trainer.async_stage: a tmpfs, host memory) -> next step
    writer (each rank)     stage -> checkpoints/.step_N.tmp, each file copied with its CRC-32 and fsynced, the
                           staged copy freed; then its part of the manifest -> .step_N.tmp/.parts/rank_K.json
    finisher (main)        every rank's part present -> the merged manifest -> checkpoint.commit (fsync, rename,
                           COMPLETE, prune)

The background threads use no collective (the training thread owns the process group): they meet through the
checkpoint's directory, which every rank sees (output_dir is shared among the nodes, as for any checkpoint). At most
one save is in flight. The training thread waits for it (``wait``: collective, every rank's outcome shared) before
the next save and at the end of the loop (a preemption's stop step included: its checkpoint is waited for within
the signal's grace), and, bounded and without collectives, when the loop fails (``settle``). A write that fails
ends the run at that wait in one line naming the rank, the path, the bytes needed and the bytes free. Its ``.tmp``
directory never gets a COMPLETE marker and the next save or run removes it. A kill mid-write leaves the same
thing, and the previous checkpoint is resumed from.

Staging needs host memory for one checkpoint's share of this rank; where the stage has no room for it (estimated
from the local tensors of the model and optimizer), that checkpoint is written synchronously, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from .guards import TrainingError

log = logging.getLogger("distsft")
PARTS = ".parts"
CHUNK = 1 << 24


class Background:
    """One rank's background checkpoint writer (and, on the main process, the finisher)."""

    def __init__(self, acc, output_dir: Path, stage: str, model, optimizer):
        run = hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:12]
        self.root = Path(stage) / f"distsft-{run}" / f"rank_{acc.process_index}"
        shutil.rmtree(self.root, ignore_errors=True)  # a killed run's copy would hold host memory until reboot
        self.rank, self.main = acc.process_index, acc.is_main_process
        self.objects = (model, optimizer)
        self.writer: threading.Thread | None = None
        self.finisher: threading.Thread | None = None
        self.outcome: dict = {}  # "error" (this rank's writer), "finish" (the finisher's)
        self.cancel = threading.Event()
        self.started = 0.0
        self.last: tuple[str, float] | None = None  # (name, seconds from staging to COMPLETE) of the last save

    @property
    def writing(self) -> bool:
        """A save is in flight (started and not yet waited for)."""
        return self.writer is not None

    # ---- the training thread
    def stage(self, acc, tmp: Path, name: str) -> bool:
        """Stage this checkpoint in host memory (collective); False: some rank has no room (write it now)."""
        need = int(local_state_bytes(*self.objects) * 1.1) + (64 << 20)
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        room = torch.tensor([1 if free >= need else 0], device=acc.device)
        if acc.num_processes > 1:
            torch.distributed.all_reduce(room, op=torch.distributed.ReduceOp.MIN)
        if not room.item():
            log.warning("trainer.async_save: %s has %.1f MB free, a rank needs about %.1f MB to stage checkpoint %s "
                        "in host memory; writing it synchronously (a larger tmpfs, or trainer.async_stage=<dir>)",
                        self.root.parent, free / 1e6, need / 1e6, name)
            return False
        staged = self.root / name
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        self.started = t0 = time.perf_counter()
        from .collective import every_rank_writes

        try:  # every rank its own files, into memory
            every_rank_writes(acc, lambda: acc.save_state(str(staged)), f"staging checkpoint {name}", staged)
        except TrainingError:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        log.info("checkpoint %s staged in host memory in %.2f s; writing it in the background", name,
                 time.perf_counter() - t0)
        return True

    def write(self, acc, tmp: Path, final: Path, marker: dict, describe: Callable[[], None], keep: int) -> None:
        """Start writing the staged checkpoint into ``tmp`` behind the loop; the main process also describes it
        (config, provenance) and starts the finisher."""
        staged = self.root / final.name
        self.outcome, self.cancel = {}, threading.Event()
        if self.main:
            describe()
        self.writer = threading.Thread(target=self._write, args=(staged, tmp), name="distsft-ckpt-writer",
                                       daemon=True)
        self.writer.start()
        if self.main:
            self.finisher = threading.Thread(target=self._finish, args=(tmp, final, marker, acc.num_processes, keep),
                                             name="distsft-ckpt-finisher", daemon=True)
            self.finisher.start()

    def wait(self, acc) -> None:
        """Wait for the save in flight (collective; nothing in flight: returns at once on every rank). A failure on
        any rank raises the same one-line TrainingError on every rank."""
        if self.writer is None:
            return
        self.writer.join()
        errors = [self.outcome.get("error")]
        if acc.num_processes > 1:
            gathered: list = [None] * acc.num_processes
            torch.distributed.all_gather_object(gathered, errors[0])
            errors = gathered
        failed = next((e for e in errors if e), None)
        if failed:
            self.cancel.set()
        if self.finisher is not None:
            self.finisher.join()
            failed = failed or self.outcome.get("finish")
        if acc.num_processes > 1:
            box = [failed]
            torch.distributed.broadcast_object_list(box, src=0)
            failed = box[0]
        self.writer = self.finisher = None
        if failed:
            raise TrainingError(failed)

    def close(self) -> None:
        """Give this rank's stage back (after the last wait)."""
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.parent.rmdir()  # the last rank of the node out removes the run's directory

    def settle(self, timeout: float = 120.0) -> None:
        """The loop failed: give the save in flight up to ``timeout`` seconds to complete (no collective)."""
        deadline = time.monotonic() + timeout
        for thread in (self.writer, self.finisher):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self.cancel.set()
        self.close()

    # ---- the background threads
    def _write(self, staged: Path, tmp: Path) -> None:
        files, target = {}, None
        try:
            for src in sorted(p for p in staged.rglob("*") if p.is_file()):
                rel = src.relative_to(staged)
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                files[str(rel)] = [src.stat().st_size, copy_with_crc(src, target)]
                src.unlink()  # host memory back as soon as the copy is on the disk
            target = tmp / PARTS / f"rank_{self.rank}.json"
            target.parent.mkdir(exist_ok=True)
            _write_durably(target, json.dumps(files))
        except OSError as e:
            need = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
            free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
            self.outcome["error"] = (f"writing checkpoint {tmp.name.strip('.').removesuffix('.tmp')} in the background "
                                     f"failed on rank {self.rank}: {e} (writing {target}; {need / 1e6:.1f} MB still "
                                     f"to write, {free / 1e6:.1f} MB free there); the earlier checkpoints stay "
                                     f"trusted")
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _finish(self, tmp: Path, final: Path, marker: dict, world: int, keep: int) -> None:
        from .checkpoint import commit

        parts = [tmp / PARTS / f"rank_{r}.json" for r in range(world)]
        while not all(p.exists() for p in parts):
            if self.cancel.wait(0.2):
                return  # a writer failed: the directory is never made complete
        try:
            files = {}
            for p in parts:
                files.update(json.loads(p.read_text()))
            shutil.rmtree(tmp / PARTS)
            for rel in ("config.yaml", "provenance.json"):  # written by the main process, not staged
                if (tmp / rel).exists():
                    files[rel] = [(tmp / rel).stat().st_size, _crc32(tmp / rel)]
            commit(tmp, final, {**marker, "files": files}, keep)
            self.last = (final.name, time.perf_counter() - self.started)
            log.info("checkpoint %s complete (%.2f s from staging to COMPLETE, behind the loop)", *self.last)
        except OSError as e:
            self.outcome["finish"] = f"completing checkpoint {final.name} in the background failed: {e}"


def copy_with_crc(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` (fsynced); the CRC-32 of what was written."""
    crc = 0
    with src.open("rb") as fi, dst.open("wb") as fo:
        while chunk := fi.read(CHUNK):
            fo.write(chunk)
            crc = zlib.crc32(chunk, crc)
        fo.flush()
        os.fsync(fo.fileno())
    return crc


def local_state_bytes(model, optimizer) -> int:
    """Bytes of the tensors this rank holds for a checkpoint: parameters (its shards) and optimizer state,
    each tensor counted once."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else getattr(t, "ds_tensor", t)
            key = (local.data_ptr(), local.numel())
            if key not in seen:
                seen.add(key)
                total += local.numel() * local.element_size()

    for p in model.parameters():
        add(p)
    inner = optimizer
    while inner is not None:
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                add(p)
        for state in getattr(inner, "state", {}).values():
            for t in state.values() if isinstance(state, dict) else ():
                add(t)
        inner = getattr(inner, "optimizer", None)
    return total


def _crc32(path: Path) -> int:
    from .checkpoint import _crc32 as crc32

    return crc32(path)


def _write_durably(path: Path, text: str) -> None:
    from .checkpoint import _write_durably as write

    write(path, text)
