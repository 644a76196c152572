"""Trainer (reshape): resume a DeepSpeed ZeRO checkpoint (stages 1-3) on another number of processes.

A ZeRO checkpoint holds the optimizer state (fp32 masters, moments) in one partition per rank, so it loads only on
the world size that wrote it. DeepSpeed's own answer is the universal checkpoint: one file per parameter and state,
which any world size loads (``checkpoint.load_universal``). When the world size changed, the main process converts
the checkpoint's ``pytorch_model`` with ``deepspeed.checkpoint.ds_to_universal`` into a view beside it,

    checkpoints/.step_N.universal.tmp/    pytorch_model/ (universal: zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt)
                                          every other file of step_N, linked (scheduler, RNG, trainer state)

every rank loads that view with the engine's universal loader, and the view is removed (a crash leaves a ``.tmp``
directory, which the next run removes). The checkpoint itself is never changed: its manifest stays true. The data
position, scheduler and guards come from the trainer state as on any resume; the data order does not depend on the
world size (data.loader).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import torch

from ..compat import checked
from .checkpoint import MARKER
from .collective import main_decides

log = logging.getLogger("distsft")


def written_by(ckpt: Path) -> int | None:
    """The number of processes that wrote a checkpoint (its COMPLETE marker), if recorded."""
    try:
        return json.loads((ckpt / MARKER).read_text()).get("world_size")
    except (OSError, ValueError):
        return None


def universal_view(acc, ckpt: Path) -> Path:
    """The universal view of a DeepSpeed checkpoint (made by the main process; collective)."""
    view = ckpt.parent / f".{ckpt.name}.universal.tmp"

    def build():
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        shutil.rmtree(view, ignore_errors=True)
        view.mkdir(parents=True)
        args = argparse.Namespace(input_folder=str(ckpt / "pytorch_model"), output_folder=str(view / "pytorch_model"),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # distsft's engine records no Megatron layout
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints each stage
            to_universal(args)
        for f in ckpt.iterdir():
            if f.name not in ("pytorch_model", "latest", MARKER):
                (view / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())

    main_decides(acc, build, f"converting {ckpt} to a universal checkpoint")
    return view


def load_reshaped(acc, model, ckpt: Path, was: int) -> None:
    """Load ``ckpt``, written by ``was`` processes under DeepSpeed, into this run of another world size."""
    checked("deepspeed", ("0.19",), "a resharded resume (DeepSpeed's universal loader mended)")
    view = universal_view(acc, ckpt)
    config = model._config  # the DeepSpeed engine's: its loader reads the flag
    groups = model.optimizer.param_groups
    # ZeRO-3's universal loader gives every group the first group's hyperparameters (DeepSpeed 0.19): the weight
    # decay of the 2-D weights would land on norms and biases. Keep each group's own; the rate is the schedule's
    # (the same factor for every group), as loaded
    own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    config.load_universal_checkpoint = True
    try:
        acc.load_state(str(view))
    finally:
        config.load_universal_checkpoint = False
    for group, hyper in zip(groups, own):
        group.update(hyper)
    # ZeRO-3's universal loader hands every parameter group the same `step` tensor (DeepSpeed 0.19); torch's AdamW
    # counts it up in place once per group, so from the second group on the bias correction would run ahead
    # (measured: 7e-4 off after one step). One tensor each
    inner = getattr(model.optimizer, "optimizer", model.optimizer)
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    acc.wait_for_everyone()  # every rank has read the view before the main process removes it
    main_decides(acc, lambda: shutil.rmtree(view, ignore_errors=True), f"removing {view}")
    log.info("resharded %s: written by %d processes, loaded by %d (DeepSpeed universal checkpoint: fp32 masters, "
             "moments and step of every parameter; scheduler, RNG and data position as saved)", ckpt, was,
             acc.num_processes)
