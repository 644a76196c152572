"""The whole pipeline: config -> data -> model -> Accelerate loop -> export -> summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed
from omegaconf import OmegaConf

from .config import Config, check_device_combinations, resolve_batch
from .data.loader import StepLoader, eval_batches, pack, summarize
from .data.prepare import prepare
from .data.templates import end_of_turn_id
from .diagnose import describe as describe_diagnosis
from .diagnose import diagnose
from .export import export_final
from .provenance import provenance
from .model.attention import describe_attention
from .model.load import count_parameters, load_model, load_tokenizer, whole_model
from .trainer import checkpoint
from .trainer.accelerator import build_accelerator, launched_world_size
from .trainer.strategy import describe as describe_strategy
from .trainer.loop import LoopParts, train
from .trainer.metrics import model_flops, peak_flops
from .model.peft import apply_peft, quantization_config
from .trainer.optim import build_optimizer
from .trainer.optim import describe as describe_optimizer
from .trainer.schedule import build_scheduler, warmup_steps

log = logging.getLogger("distsft")


@dataclass
class RunResult:
    summary: dict
    model: object  # the trained model (as prepared by Accelerate)
    tokenizer: object


def run(cfg: Config) -> RunResult:
    t0 = time.time()
    plan = resolve_batch(cfg.trainer.micro_batch_size, cfg.trainer.grad_accum,
                         cfg.trainer.global_batch_size, launched_world_size())
    acc = build_accelerator(cfg.parallel, cfg.trainer, plan)
    set_seed(cfg.trainer.seed)  # python, numpy, torch on every process (dropout, workers)
    if not acc.is_main_process:  # rank 0 speaks
        logging.getLogger().setLevel(logging.WARNING)
    out = Path(cfg.output_dir)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    tokenizer = load_tokenizer(cfg.model)
    with acc.main_process_first():  # rank 0 tokenizes and fills the cache; the others then read it
        data = prepare(cfg.data, tokenizer, cfg.model.tokenizer or cfg.model.name_or_path)
    use_template(tokenizer, data.template, cfg.data.chat_template)
    train_rows = pack(data.train, cfg.data, data.train_stats)
    loader = StepLoader(data.train, train_rows, plan, acc.process_index, cfg.data,
                        tokenizer.pad_token_id, pin_memory=acc.device.type == "cuda")
    total = loader.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps)
    ev = None
    if data.eval is not None:
        ev = eval_batches(data.eval, pack(data.eval, cfg.data, data.eval_stats), plan.micro_batch_size,
                          acc.process_index, acc.num_processes, cfg.data, tokenizer.pad_token_id)
    cuda = acc.device.type == "cuda"
    check_device_combinations(cfg, cuda)
    zero3 = cfg.parallel.strategy == "deepspeed" and cfg.parallel.zero_stage == 3
    quant = quantization_config(cfg.peft, zero3)
    device = acc.device.index if cuda else "cpu"
    with whole_model(acc, cfg.model.init == "config"):
        model = load_model(cfg.model, cfg.trainer.seed, cuda=cuda, quantization=quant, device=device)
    model = apply_peft(model, cfg.peft, cfg.model.gradient_checkpointing)
    trainable, n_params = count_parameters(model)

    # Only now, with data and config known to be good, does anything get written.
    _setup_run_dir(acc, out, resolved)
    log.info("batch: %s", plan.describe())
    log.info("strategy: %s on %d %s process(es)", describe_strategy(cfg.parallel), acc.num_processes, acc.device.type)
    log.info("attention: %s", describe_attention(model.config._attn_implementation, cfg.data.mode))
    log.info(summarize("train", data.train_stats))
    if data.eval_stats:
        log.info(summarize("eval", data.eval_stats))
    if data.skipped.rows:
        log.warning("skipped %d bad rows %s; see %s", len(data.skipped.rows), data.skipped.counts(),
                    out / "skipped_rows.jsonl")
        _write_skipped(acc, out, data.skipped)
    log.info("steps: %d per epoch, %d in all, %d warmup", loader.steps_per_epoch, total,
             warmup_steps(cfg.schedule, total))
    log.info("parameters: trainable %s / %s = %.2f%%", f"{trainable:,}", f"{n_params:,}", 100 * trainable / n_params)

    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = acc.prepare(model, optimizer)
    log.info("optimizer: %s (%s)", describe_optimizer(optimizer), cfg.optim.name)
    # after prepare: ZeRO regroups the optimizer's parameters, the schedule must see the final groups
    scheduler = build_scheduler(optimizer, cfg.schedule, total)
    state = checkpoint.TrainState()
    acc.register_for_checkpointing(scheduler, state)
    _maybe_resume(acc, cfg, out, resolved, data.fingerprint)
    prov = provenance(data.fingerprint)

    parts = LoopParts(acc, model, optimizer, scheduler, loader, ev or None, state, total, out, resolved,
                      flops=model_flops(acc.unwrap_model(model), trainable, n_params),
                      peak_flops=peak_flops(cfg.logging.peak_flops), provenance=prov, tokenizer=tokenizer)
    outcome = train(parts, cfg.trainer, cfg.logging)
    status = outcome["status"]
    finished = status in ("finished", "early_stopped")
    diagnosis = diagnose(parts.history["train_loss"], parts.history["eval_loss"], cfg.diagnosis.bands)
    summary = {"status": status, "steps": state.step, "total_steps": total,
               "skipped_steps": outcome["skipped_steps"], "best_eval": outcome["best_eval"],
               "diagnosis": diagnosis, "provenance": prov,
               "tokens": state.tokens, "supervised_tokens": state.supervised_tokens,
               "final_train_loss": _last(parts.history["train_loss"]),
               "final_eval_loss": _last(parts.history["eval_loss"]),
               "train_loss_history": parts.history["train_loss"], "eval_loss_history": parts.history["eval_loss"],
               "batch": plan.__dict__, "strategy": describe_strategy(cfg.parallel), "parameters": {"trainable": trainable, "total": n_params},
               "data": {"train": data.train_stats.as_dict(),
                        "eval": data.eval_stats.as_dict() if data.eval_stats else None,
                        "skipped_rows": data.skipped.counts(), "cache_hit": data.cache_hit},
               "wall_time_s": time.time() - t0}
    if finished and cfg.export.enabled and cfg.trainer.export_best and outcome["best_eval"]:
        acc.load_state(str(out / "checkpoints" / "best"))  # export the best eval, not the last step
        summary["exported_step"] = outcome["best_eval"]["step"]
    if finished and cfg.export.enabled:
        def base_loader():  # the un-quantised base, for export.mode=merged (rank 0 only: no zero.Init)
            with whole_model(acc):
                return load_model(cfg.model, cfg.trainer.seed)

        summary["final_dir"] = str(export_final(acc, model, tokenizer, out, resolved, cfg.export.mode, base_loader,
                                                prov))
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("done: %s after %d steps, train loss %s, eval loss %s, %.1fs", summary["status"],
                 state.step, summary["final_train_loss"], summary["final_eval_loss"], summary["wall_time_s"])
        log.info(describe_diagnosis(diagnosis))
    acc.wait_for_everyone()  # every rank leaves together: no rank tears down a group another still uses
    acc.end_training()
    _close_run_log()
    return RunResult(summary, model, tokenizer)


def use_template(tokenizer, template: str, name: str | None) -> None:
    """Train and export with the same template; a built-in template's end-of-turn also stops generation."""
    tokenizer.chat_template = template
    eot = end_of_turn_id(name, tokenizer)
    if eot is not None and eot != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eot)


def _write_skipped(acc, out: Path, skipped) -> None:
    if acc.is_main_process:
        with (out / "skipped_rows.jsonl").open("w") as f:
            for row in skipped.rows:
                f.write(json.dumps(row) + "\n")


def _last(history: list) -> float | None:
    return history[-1][1] if history else None


class _RunLog(logging.FileHandler):
    """output_dir/train.log; removed again at the end of run() (a sweep runs several in one process)."""


def _close_run_log() -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _RunLog)]:
        root.removeHandler(h)
        h.close()


def _setup_run_dir(acc, out: Path, resolved: dict) -> None:
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), out / "config.yaml")
        _close_run_log()
        handler = _RunLog(out / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        logging.getLogger().addHandler(handler)
    # Accelerate logs every file of every checkpoint at INFO; keep the run log readable
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    acc.wait_for_everyone()


def _maybe_resume(acc, cfg: Config, out: Path, resolved: dict, fingerprint: str) -> None:
    ckpt = checkpoint.find_resume(cfg.trainer.resume, out / "checkpoints")
    if ckpt is None:
        return
    checkpoint.check_compatible(ckpt, resolved, acc.num_processes, fingerprint, cfg.trainer.resume_force)
    acc.load_state(str(ckpt))
    log.info("resumed from %s at step %d", ckpt, int(ckpt.name.split("_")[1]))
