"""The whole pipeline: config -> data -> model -> Accelerate loop -> export -> summary."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed
from omegaconf import OmegaConf

from .batch import resolve_batch
from .checks import check_paths
from .config import Config
from .data.build import agree_on_data, build_data
from .model.build import build_model
from .model.load import load_tokenizer
from .provenance import provenance
from .report import finish, log_start
from .trainer import checkpoint
from .trainer.accelerator import build_accelerator, launched_world_size
from .trainer.loop import LoopParts, train
from .trainer.metrics import model_flops, peak_flops
from .trainer.optim import build_optimizer
from .trainer.optim import describe as describe_optimizer
from .trainer.reshape import restore
from .trainer.rundir import close_run_log, locked, resume_target, setup_run_dir
from .trainer.samples import loop_logging
from .trainer.schedule import build_scheduler
from .trainer.trackers import accelerate_trackers
from .trainer.watchdog import Watchdog

log = logging.getLogger("distsft")


@dataclass
class RunResult:
    summary: dict
    model: object  # the trained model (as prepared by Accelerate)
    tokenizer: object


def run(cfg: Config) -> RunResult:
    """config -> data -> model -> Accelerate loop -> export -> summary."""
    t0 = time.time()
    check_paths(cfg)  # before the accelerator, the data and the model: nothing is written or loaded yet
    plan = resolve_batch(cfg.trainer.micro_batch_size, cfg.trainer.grad_accum,
                         cfg.trainer.global_batch_size, launched_world_size(), cfg.parallel.sp_size,
                         cfg.parallel.tp_size)
    acc = build_accelerator(cfg.parallel, cfg.trainer, plan, accelerate_trackers(cfg.logging.trackers))
    set_seed(cfg.trainer.seed)  # python, numpy, torch on every process (dropout, workers)
    if not acc.is_main_process:  # rank 0 speaks
        logging.getLogger().setLevel(logging.WARNING)
    tokenizer = load_tokenizer(cfg.model)
    d = build_data(cfg, acc, tokenizer, plan)
    agree_on_data(acc, d)  # every rank trains on the same tokens in the same steps, or none starts
    model, trainable, n_params = build_model(cfg, acc, plan.micro_batch_size)
    out = Path(cfg.output_dir)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    resume_from = resume_target(acc, cfg, out, resolved, d.data.fingerprint)  # checked before anything is written
    with locked(acc, out):  # one trainer per output_dir (every rank stops if it is taken)
        setup_run_dir(acc, out, resolved)  # only now, with data, config, checkpoint and lock known to be good
        log_start(cfg, acc, plan, d, model, trainable, n_params, out)
        model, optimizer, scheduler, state = _training_objects(cfg, acc, model, d.total, resume_from)
        prov = provenance(d.data.fingerprint)
        parts = LoopParts(acc, model, optimizer, scheduler, d.loader, d.eval_batches, state, d.total, out, resolved,
                          flops=model_flops(acc.unwrap_model(model), trainable, n_params),
                          peak_flops=peak_flops(cfg.logging.peak_flops), provenance=prov, tokenizer=tokenizer)
        dog = Watchdog.for_run(acc, cfg.trainer.hang_timeout, out)  # a silent or stuck rank ends the job
        try:
            outcome = train(parts, cfg.trainer, loop_logging(cfg))
        finally:
            if dog is not None:
                dog.stop()
        summary = finish(cfg, acc, plan, d, parts, outcome, (trainable, n_params), t0)
        acc.wait_for_everyone()  # every rank leaves together: no rank tears down a group another still uses
        acc.end_training()
        close_run_log()
    return RunResult(summary, parts.model, tokenizer)


def _training_objects(cfg: Config, acc, model, total_steps: int, resume_from: Path | None):
    """(model, optimizer, scheduler, state) prepared by Accelerate, and restored from ``resume_from``."""
    optimizer = build_optimizer(model, cfg.optim, stochastic_round=cfg.trainer.precision == "bf16_pure")
    model, optimizer = acc.prepare(model, optimizer)
    log.info("optimizer: %s (%s)", describe_optimizer(optimizer), cfg.optim.name)
    # after prepare: ZeRO regroups the optimizer's parameters, the schedule must see the final groups
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    state = checkpoint.TrainState()
    acc.register_for_checkpointing(scheduler, state)
    if resume_from is not None:
        restore(acc, model, cfg.parallel, resume_from)  # on any number of processes (trainer.reshape)
        # the micro-batch counter that decides the accumulation boundary is the writer's: another world size may
        # accumulate another number of micro-batches per step (Accelerate's, and the DeepSpeed engine's own)
        acc.step = state.step * acc.gradient_accumulation_steps
        if hasattr(model, "micro_steps"):
            model.micro_steps = acc.step
        log.info("resumed from %s at step %d", resume_from, int(resume_from.name.split("_")[1]))
    return model, optimizer, scheduler, state
