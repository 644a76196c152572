"""The whole pipeline: config -> data -> model -> Accelerate loop -> export -> summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed
from omegaconf import OmegaConf

from .config import Config, resolve_batch
from .data.loader import StepLoader, build_data, eval_batches, summarize
from .export import export_final
from .model.load import count_parameters, load_model, load_tokenizer
from .trainer import checkpoint
from .trainer.accelerator import build_accelerator
from .trainer.loop import LoopParts, train
from .trainer.optim import build_optimizer
from .trainer.schedule import build_scheduler, warmup_steps

log = logging.getLogger("distsft")


@dataclass
class RunResult:
    summary: dict
    model: object  # the trained model (as prepared by Accelerate)
    tokenizer: object


def run(cfg: Config) -> RunResult:
    t0 = time.time()
    acc = build_accelerator(cfg.parallel, cfg.trainer)
    set_seed(cfg.trainer.seed)  # python, numpy, torch on every process (dropout, workers)
    out = Path(cfg.output_dir)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    plan = resolve_batch(cfg.trainer.micro_batch_size, cfg.trainer.grad_accum,
                         cfg.trainer.global_batch_size, acc.num_processes)
    tokenizer = load_tokenizer(cfg.model)
    with acc.main_process_first():
        (train_store, train_rows, train_stats), evals = build_data(cfg.data, tokenizer)
    loader = StepLoader(train_store, train_rows, plan, acc.process_index, cfg.data,
                        tokenizer.pad_token_id, pin_memory=acc.device.type == "cuda")
    total = loader.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps)
    ev = evals and eval_batches(evals[0], evals[1], plan.micro_batch_size, acc.process_index,
                                acc.num_processes, cfg.data, tokenizer.pad_token_id)
    model = load_model(cfg.model, cfg.trainer.seed)
    trainable, n_params = count_parameters(model)

    # Only now, with data and config known to be good, does anything get written.
    _setup_run_dir(acc, out, resolved)
    log.info("batch: %s", plan.describe())
    log.info(summarize("train", train_stats))
    if evals:
        log.info(summarize("eval", evals[2]))
    log.info("steps: %d per epoch, %d in all, %d warmup", loader.steps_per_epoch, total,
             warmup_steps(cfg.schedule, total))
    log.info("parameters: trainable %s / %s = %.2f%%", f"{trainable:,}", f"{n_params:,}", 100 * trainable / n_params)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total)
    model, optimizer = acc.prepare(model, optimizer)
    state = checkpoint.TrainState()
    acc.register_for_checkpointing(scheduler, state)
    _maybe_resume(acc, cfg, out, resolved)

    parts = LoopParts(acc, model, optimizer, scheduler, loader, ev or None, state, total, out, resolved)
    finished = train(parts, cfg.trainer, cfg.logging)["finished"]
    summary = {"status": "finished" if finished else "stopped", "steps": state.step, "total_steps": total,
               "tokens": state.tokens, "supervised_tokens": state.supervised_tokens,
               "final_train_loss": _last(parts.history["train_loss"]),
               "final_eval_loss": _last(parts.history["eval_loss"]),
               "train_loss_history": parts.history["train_loss"], "eval_loss_history": parts.history["eval_loss"],
               "batch": plan.__dict__, "parameters": {"trainable": trainable, "total": n_params},
               "data": {"train": train_stats.as_dict(), "eval": evals[2].as_dict() if evals else None},
               "wall_time_s": time.time() - t0}
    if finished and cfg.export.enabled:
        summary["final_dir"] = str(export_final(acc, model, tokenizer, out, resolved))
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("done: %s after %d steps, train loss %s, eval loss %s, %.1fs", summary["status"],
                 state.step, summary["final_train_loss"], summary["final_eval_loss"], summary["wall_time_s"])
    acc.end_training()
    return RunResult(summary, model, tokenizer)


def _last(history: list) -> float | None:
    return history[-1][1] if history else None


def _setup_run_dir(acc, out: Path, resolved: dict) -> None:
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), out / "config.yaml")
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        logging.getLogger().addHandler(handler)
    else:  # rank 0 speaks
        logging.getLogger().setLevel(logging.WARNING)
    # Accelerate logs every file of every checkpoint at INFO; keep the run log readable
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    acc.wait_for_everyone()


def _maybe_resume(acc, cfg: Config, out: Path, resolved: dict) -> None:
    ckpt = checkpoint.find_resume(cfg.trainer.resume, out / "checkpoints")
    if ckpt is None:
        return
    checkpoint.check_compatible(ckpt, resolved)
    acc.load_state(str(ckpt))
    log.info("resumed from %s at step %d", ckpt, int(ckpt.name.split("_")[1]))
