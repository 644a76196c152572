"""Trainer: atomic checkpoints and exact resume.

    output_dir/checkpoints/step_<N>/     model, optimizer, scheduler, RNG of every rank,
                                         trainer state (step, data position, guards, logged
                                         history), config.yaml, COMPLETE

Every rank writes into ``.step_<N>.tmp``; after a barrier the main process records the size and
CRC-32 of every file in a manifest (each rank checksums its share of the files), fsyncs the files and the
directory, renames it and only then writes ``COMPLETE`` (holding the manifest; itself written to a temp file,
fsynced and renamed). A directory without ``COMPLETE`` (a crash mid-save, before or after the rename) is never
resumed from and is removed by the next save or at the start of the next run. The main process's parts run
under ``collective.main_decides``: a failure there (a full disk) stops every rank at once, in one line, and so
does a failed write of any rank's own files (``collective.every_rank_writes``, whatever library raised it); the
failed save's directory is removed (``discard``), giving its room back. On resume every file is checked
against the manifest (the checksums shared among the ranks): ``trainer.resume=auto`` skips a damaged checkpoint
(truncated, emptied, altered, missing files), naming it and what is wrong, and resumes from the newest intact
one; an explicit ``trainer.resume=<dir>`` that is damaged is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..config import ConfigError
from ..provenance import training_differences
from .guards import TrainingError

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")
# settings of parallel.* whose change ``trainer.reshape.route`` decides (check_compatible leaves them to it); a user's
# DeepSpeed JSON holds only what distsft does not own (buckets, thresholds: how, not what, is computed)
LAYOUT_KEYS = ("parallel.strategy", "parallel.zero_stage", "parallel.offload_optimizer", "parallel.offload_params",
               "parallel.fsdp_reshard_after_forward", "parallel.deepspeed_config", "parallel.dp_shard_size",
               "parallel.tp_size", "parallel.quantized_comm")


@dataclass
class TrainState:
    """Position of the run; saved in every checkpoint (Accelerate's custom checkpoint object)."""

    step: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    guards: dict = field(default_factory=dict)  # early stopping, spike median, skipped steps (guards.Stateful)
    history: dict = field(default_factory=dict)  # logged (step, value) lists: summary.json and the diagnosis

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / MARKER).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume(resume: str, root: Path, acc=None) -> Path | None:
    """The checkpoint to resume from: ``auto`` the newest intact one (a damaged one is named and skipped),
    ``never`` none, else the path given (refused if it is not complete and intact). With ``acc``, every rank
    takes part and returns the same answer: the files' checksums are shared among the ranks (``damage``)."""
    if resume == "never":
        return None
    if resume == "auto":
        for _, ckpt in reversed(complete_checkpoints(root)):  # newest first: the newest intact one
            problems = damage(ckpt, acc)
            if not problems:
                return ckpt
            if acc is None or acc.is_main_process:
                    log.warning("not resuming from %s: it is damaged (%s); trying an older checkpoint", ckpt,
                            "; ".join(problems))
        return None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise ConfigError(f"trainer.resume={resume}: not a complete checkpoint (no {MARKER} marker)")
    problems = damage(path, acc)
    if problems:
        raise ConfigError(f"trainer.resume={resume}: the checkpoint is damaged ({'; '.join(problems)}); resume from "
                          "another one, or trainer.resume=auto to take the newest intact one")
    return path


def manifest(directory: Path, acc=None) -> dict[str, list[int]]:
    """{relative path: [size, CRC-32]} of every file under ``directory``; with ``acc`` the files are shared among
    the ranks (collective: every rank calls it and gets the whole manifest). An unreadable file raises its
    OSError."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    out = {}
    for p, crc in zip(files, _crcs(files, acc)):
        if isinstance(crc, BaseException):
            raise crc
        out[str(p.relative_to(directory))] = [p.stat().st_size, crc]
    return out


def damage(ckpt: Path, acc=None) -> list[str]:
    """What is wrong with a checkpoint's files against its manifest (empty: intact). A checkpoint written
    before manifests existed is trusted as it is. With ``acc`` the checksums are shared among the ranks
    (collective: every rank calls it and gets the same answer)."""
    try:
        expected = json.loads((ckpt / MARKER).read_text()).get("files")
    except (OSError, ValueError) as e:
        return [f"unreadable {MARKER} marker: {e}"]
    if expected is None:
        return []
    problems, present = [], []
    for rel, (size, _) in expected.items():
        f = ckpt / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel} has {f.stat().st_size} bytes, {size} were written")
        else:
            present.append(rel)
    for rel, crc in zip(present, _crcs([ckpt / rel for rel in present], acc)):
        if isinstance(crc, BaseException):
            problems.append(f"{rel} cannot be read ({crc})")
        elif crc != expected[rel][1]:
            problems.append(f"{rel} differs from what was written (checksum)")
    return problems


def _crcs(files: list[Path], acc) -> list:
    """CRC-32 of each file (or the OSError reading it): shared among the ranks with ``acc``, else in threads on
    this process (zlib frees the GIL)."""
    if acc is not None and acc.num_processes > 1:
        from .collective import share_files

        return share_files(acc, files, _crc32)

    def crc_or_error(path: Path):
        try:
            return _crc32(path)
        except OSError as e:
            return e

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(crc_or_error, files))


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_tree(directory: Path) -> None:
    """Flush every file and directory under ``directory`` (deepest first, itself last) to the disk."""
    for p in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)) + [directory]:
        _fsync(p)


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_compatible(ckpt: Path, current: dict, data_fingerprint: str, force: bool) -> None:
    """Refuse a checkpoint trained with other settings or data (``force``: warn). The number of processes, the
    micro-batch / accumulation split and the parallel layout are trainer.reshape's to decide."""
    saved = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml"))
    diffs = [d for d in training_differences(saved, current) if not d.startswith(LAYOUT_KEYS)]
    prov = ckpt / "provenance.json"
    was_data = json.loads(prov.read_text()).get("data_fingerprint") if prov.exists() else data_fingerprint
    if was_data != data_fingerprint:
        diffs.append(f"training data: fingerprint was {was_data}, now {data_fingerprint} "
                     "(files or data options changed)")
    if diffs and not force:
        raise ConfigError(f"cannot resume from {ckpt}: what it was trained with differs:\n  " + "\n  ".join(diffs)
                          + "\n(a new run: run_name=<name> or output_dir=<dir>; trainer.resume=never starts over in "
                          "this directory; trainer.resume_force=true resumes anyway)")
    if diffs:
        log.warning("resuming from %s despite differences (trainer.resume_force): %s", ckpt, "; ".join(diffs))


def save(accelerator, root: Path, step: int, resolved: dict, keep: int, name: str | None = None,
         provenance: dict | None = None, background=None) -> Path:
    """checkpoints/step_<N> (or checkpoints/<name>, e.g. best, which is never pruned nor resumed from). The main
    process's parts run under ``main_decides``, the ranks' own writes under ``every_rank_writes``: a failure there
    (a full disk) stops every rank at once, and what the save wrote is removed. With
    ``background`` (trainer.async_save's ``async_save.Background``) a step checkpoint is written behind the loop;
    any save first waits for the one in flight."""
    from .collective import every_rank_writes, main_decides

    name = name or f"step_{step}"
    final, tmp = root / name, root / f".{name}.tmp"
    what = f"saving checkpoint {name}"
    if background is not None:
        background.wait(accelerator)  # at most one save in flight, and never two writers of one directory

    def start():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    try:
        main_decides(accelerator, start, what, tmp)  # (its broadcast is the barrier before every rank writes)
        if background is not None and name.startswith("step_") and background.stage(accelerator, tmp, name):
            background.write(accelerator, tmp, final, {"step": step, "world_size": accelerator.num_processes},
                             lambda: describe(tmp, resolved, provenance), keep)
            return final
        every_rank_writes(accelerator, lambda: accelerator.save_state(str(tmp)), what, tmp)
        main_decides(accelerator, lambda: describe(tmp, resolved, provenance), what, tmp)
        files = manifest(tmp, accelerator)  # every rank checksums its share of the files
        main_decides(accelerator, lambda: commit(tmp, final, {"step": step, "world_size": accelerator.num_processes,
                                                              "files": files}, keep), what, tmp)
    except TrainingError:  # a full disk, a read-only or failing one: every rank stops in one line
        if accelerator.is_main_process:
            discard(tmp, final)
        raise
    return final


def discard(tmp: Path, final: Path) -> None:
    """After a failed save, what it left: its temporary directory (the room it took back for the next run) and a
    checkpoint renamed into place without its COMPLETE marker (which no run would trust anyway)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if final.is_dir() and not (final / MARKER).exists():
        shutil.rmtree(final, ignore_errors=True)


def describe(tmp: Path, resolved: dict, provenance: dict | None) -> None:
    """The checkpoint's config.yaml and provenance.json (main process)."""
    OmegaConf.save(OmegaConf.create(resolved), tmp / "config.yaml")
    if provenance is not None:
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def commit(tmp: Path, final: Path, marker: dict, keep: int) -> None:
    """Make a fully written ``tmp`` the checkpoint ``final`` (main process): its files on the disk, renamed, then
    the COMPLETE marker holding ``marker`` (step, world size, manifest); older ones pruned to ``keep``."""
    _fsync_tree(tmp)  # the data on the disk before anything says it is complete
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync(final.parent)
    _write_durably(final / MARKER, json.dumps(marker) + "\n")
    prune(final.parent, keep)


def prune(root: Path, keep: int) -> None:
    """Remove what no run may trust (temporary directories of an interrupted save, checkpoints renamed into place
    without their COMPLETE marker: a crash between the two) and all but the newest ``keep`` complete ones."""
    remove_incomplete(root)
    if keep > 0:
        for _, p in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def remove_incomplete(root: Path) -> list[Path]:
    """Remove ``.step_*.tmp`` (and ``.best.tmp``) directories and ``step_<N>`` / ``best`` directories without a
    COMPLETE marker; returns what was removed. Only with the run lock held (no other save in flight)."""
    if not root.is_dir():
        return []
    gone = [p for p in root.iterdir() if p.is_dir() and (
        p.name.startswith(".") and p.name.endswith(".tmp")
        or (STEP_DIR.match(p.name) or p.name == "best") and not (p / MARKER).exists())]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
