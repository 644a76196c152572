"""Trainer stage 6: atomic checkpoints and exact resume.

    output_dir/checkpoints/step_<N>/     model, optimizer, scheduler, RNG of every rank,
                                         trainer state (step, data position, guards, logged
                                         history), config.yaml, COMPLETE

Every rank writes into ``.step_<N>.tmp``; after a barrier the main process records the size and
CRC-32 of every file in a manifest, fsyncs the files and the directory, renames it and only then
writes ``COMPLETE`` (holding the manifest; itself written to a temp file, fsynced and renamed). A
directory without ``COMPLETE`` (a crash mid-save) is never resumed from and is removed by the next
save. On resume every file is checked against the manifest: ``trainer.resume=auto`` skips a damaged
checkpoint (truncated, emptied, altered, missing files), naming it and what is wrong, and resumes from
the newest intact one; an explicit ``trainer.resume=<dir>`` that is damaged is refused.
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

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")


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


def find_resume(resume: str, root: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        for _, ckpt in reversed(complete_checkpoints(root)):  # newest first: the newest intact one
            problems = damage(ckpt)
            if not problems:
                return ckpt
            log.warning("not resuming from %s: it is damaged (%s); trying an older checkpoint", ckpt,
                        "; ".join(problems))
        return None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise ConfigError(f"trainer.resume={resume}: not a complete checkpoint (no {MARKER} marker)")
    problems = damage(path)
    if problems:
        raise ConfigError(f"trainer.resume={resume}: the checkpoint is damaged ({'; '.join(problems)}); resume from "
                          "another one, or trainer.resume=auto to take the newest intact one")
    return path


def manifest(directory: Path) -> dict[str, list[int]]:
    """{relative path: [size, CRC-32]} of every file under ``directory`` (CRC in threads: zlib frees the GIL)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        crcs = list(pool.map(_crc32, files))
    return {str(p.relative_to(directory)): [p.stat().st_size, c] for p, c in zip(files, crcs)}


def damage(ckpt: Path) -> list[str]:
    """What is wrong with a checkpoint's files against its manifest (empty: intact). A checkpoint written
    before manifests existed is trusted as it is."""
    try:
        expected = json.loads((ckpt / MARKER).read_text()).get("files")
    except (OSError, ValueError) as e:
        return [f"unreadable {MARKER} marker: {e}"]
    if expected is None:
        return []
    problems = []
    for rel, (size, crc) in expected.items():
        f = ckpt / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel} has {f.stat().st_size} bytes, {size} were written")
        elif _crc32(f) != crc:
            problems.append(f"{rel} differs from what was written (checksum)")
    return problems


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


# keys whose change makes a checkpoint's data position meaningless
def check_compatible(ckpt: Path, current: dict, world_size: int, data_fingerprint: str, force: bool) -> None:
    saved = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml"))
    meta = json.loads((ckpt / MARKER).read_text())
    was = meta.get("world_size", world_size)
    par = current["parallel"]
    if was != world_size and par["strategy"] != "ddp":
        raise ConfigError(
            f"cannot resume from {ckpt}: it was written by {was} processes under {par['strategy']}, whose optimizer "
            f"state is sharded per rank, and this run has {world_size}. Resume with {was} processes, or convert it "
            f"with DeepSpeed's `python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt}/pytorch_model "
            "--output_folder <dir>` and load that into a fresh run")
    diffs = training_differences(saved, current)
    prov = ckpt / "provenance.json"
    was_data = json.loads(prov.read_text()).get("data_fingerprint") if prov.exists() else data_fingerprint
    if was_data != data_fingerprint:
        diffs.append(f"training data: fingerprint was {was_data}, now {data_fingerprint} (files or data options changed)")
    if diffs and not force:
        raise ConfigError(f"cannot resume from {ckpt}: what it was trained with differs:\n  " + "\n  ".join(diffs)
                          + "\n(a new run: run_name=<name> or output_dir=<dir>; trainer.resume=never starts over in "
                          "this directory; trainer.resume_force=true resumes anyway)")
    if diffs:
        log.warning("resuming from %s despite differences (trainer.resume_force): %s", ckpt, "; ".join(diffs))


def save(accelerator, root: Path, step: int, resolved: dict, keep: int, name: str | None = None,
         provenance: dict | None = None) -> Path:
    """checkpoints/step_<N> (or checkpoints/<name>, e.g. best, which is never pruned nor resumed from)."""
    name = name or f"step_{step}"
    final, tmp = root / name, root / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        OmegaConf.save(OmegaConf.create(resolved), tmp / "config.yaml")
        if provenance is not None:
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        files = manifest(tmp)
        _fsync_tree(tmp)  # the data on the disk before anything says it is complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync(root)
        _write_durably(final / MARKER, json.dumps({"step": step, "world_size": accelerator.num_processes,
                                                   "files": files}) + "\n")
        prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep: int) -> None:
    for p in root.glob(".step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for _, p in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
