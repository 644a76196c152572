"""Trainer stage 6: atomic checkpoints and exact resume.

    output_dir/checkpoints/step_<N>/     model, optimizer, scheduler, RNG of every rank,
                                         trainer state (step, data position, guards, logged
                                         history), config.yaml, COMPLETE

Every rank writes into ``.step_<N>.tmp``; after a barrier the main process renames it and
only then writes ``COMPLETE``. A directory without ``COMPLETE`` (a crash mid-save) is never
resumed from and is removed by the next save.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
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
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise ConfigError(f"trainer.resume={resume}: not a complete checkpoint (no {MARKER} marker)")
    return path


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
                          + "\n(use a new output_dir, trainer.resume=never, or trainer.resume_force=true to resume "
                          "anyway)")
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
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (final / MARKER).write_text(json.dumps({"step": step, "world_size": accelerator.num_processes}) + "\n")
        prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep: int) -> None:
    for p in root.glob(".step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for _, p in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
