"""Trainer (resume): load a checkpoint into this run, whatever the number of processes that wrote it.

How a checkpoint is loaded (``route``, checked before the model is built; ``restore`` after ``prepare``):

    written under      loaded under             how
    ddp                ddp, any world size      as saved (the state is whole on every rank)
    fsdp               fsdp, any world size     as saved: torch.distributed.checkpoint reshards on load (any
                       and tp_size              parallel.tp_size too: DTensors on another mesh)
    zeroK              zeroK, same world size   as saved (offload on or off)
    zeroK              zeroK, another world     DeepSpeed's universal checkpoint, converted here (below)
    any other change   refused in one line (another engine's format, or another ZeRO stage), saying what can be done

A ZeRO checkpoint holds the optimizer state (fp32 masters, moments) in one partition per rank, laid out for its
stage and world size. DeepSpeed's own answer is the universal checkpoint: one file per parameter and state, which
any world size loads (``checkpoint.load_universal``). The main process converts the checkpoint's
``pytorch_model`` with ``deepspeed.checkpoint.ds_to_universal`` into a view beside it,

    checkpoints/.step_N.universal.tmp/    pytorch_model/ (universal: zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt)
                                          every other file of step_N, linked (scheduler, RNG, trainer state)

every rank loads that view with the engine's universal loader, and the view is removed (a crash leaves a ``.tmp``
directory, which the next run removes). The checkpoint itself is never changed: its manifest stays true. The data
position, scheduler and guards come from the trainer state as on any resume; the data order does not depend on the
world size nor on the micro-batch / accumulation split (data.loader). A rank that did not exist in the writing run
has no saved RNG state and keeps the run's seed.
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
from omegaconf import OmegaConf

from ..compat import checked
from ..config import ConfigError, ParallelConfig
from .checkpoint import MARKER
from .collective import main_decides

log = logging.getLogger("distsft")


def written_by(ckpt: Path) -> int | None:
    """The number of processes that wrote a checkpoint (its COMPLETE marker), if recorded."""
    try:
        return json.loads((ckpt / MARKER).read_text()).get("world_size")
    except (OSError, ValueError):
        return None


def layout(parallel: dict) -> str:
    """The preset name of a parallel config (ddp, fsdp, zero1..3, zero3_offload), and its tensor parallelism."""
    if parallel.get("strategy") != "deepspeed":
        tp = parallel.get("tp_size") or 1
        return parallel.get("strategy", "ddp") + (f" tp_size={tp}" if tp > 1 else "")
    offload = "_offload" if parallel.get("offload_params") or parallel.get("offload_optimizer") else ""
    return f"zero{parallel.get('zero_stage')}{offload}"



def route(ckpt: Path, parallel: ParallelConfig, world: int) -> str:
    """How ``ckpt`` loads into this run: ``as saved`` or ``universal`` (a ConfigError where it cannot)."""
    saved = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml")).get("parallel", {})
    was, now = layout(saved), layout(vars(parallel))
    if saved.get("strategy") != parallel.strategy:
        raise ConfigError(
            f"cannot resume from {ckpt} under parallel={now}: it was written under parallel={was}, whose optimizer "
            f"state is in another engine's format; resume with parallel={was} (on any number of processes), or let "
            f"that run finish and start from its export (model.name_or_path=<its output_dir>/final)")
    if parallel.strategy == "deepspeed" and saved.get("zero_stage") != parallel.zero_stage:
        # (DeepSpeed 0.19's universal loaders differ per stage: ZeRO-3's reads files ZeRO-1/2 never write)
        raise ConfigError(
            f"cannot resume from {ckpt} under parallel={now}: it was written under parallel={was}, and DeepSpeed "
            f"loads ZeRO state only into its own stage; resume with parallel={was} (on any number of processes, "
            f"offload on or off), or let that run finish and start from its export (model.name_or_path=<its "
            f"output_dir>/final)")
    if parallel.strategy == "deepspeed" and written_by(ckpt) not in (None, world):
        return "universal"
    return "as saved"


def restore(acc, model, parallel: ParallelConfig, ckpt: Path) -> None:
    """Load ``ckpt`` into the prepared model, optimizer and registered objects (collective), saying what was
    resharded, from what to what."""
    was_world = written_by(ckpt) or acc.num_processes
    saved = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml")).get("parallel", {})
    was, now = layout(saved), layout(vars(parallel))
    how = route(ckpt, parallel, acc.num_processes)
    if how == "universal":
        load_universal(acc, model, ckpt)
        detail = "DeepSpeed universal checkpoint: fp32 masters, moments and step of every parameter"
    else:
        acc.load_state(str(ckpt))
        detail = ("torch.distributed.checkpoint resharded FSDP2's state on load" if parallel.strategy == "fsdp"
                  else "the state is whole on every rank")
    if (was_world, was) != (acc.num_processes, now):
        log.info("resharded %s: written by %d processes under %s, loaded by %d under %s (%s; scheduler, RNG and data "
                 "position as saved%s)", ckpt, was_world, was, acc.num_processes, now, detail,
                 "; ranks the writing run did not have keep the run's seed" if acc.num_processes > was_world else "")


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


def load_universal(acc, model, ckpt: Path) -> None:
    """Load the DeepSpeed checkpoint ``ckpt`` through its universal view (another world size)."""
    checked("trainer.reshape")
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
