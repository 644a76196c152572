"""What a run says: its start lines (batch, strategy, precision, attention, data, steps, parameters) and, after the
loop, the summary, the export (final/), summary.json, the diagnosis and curves.png."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import Config
from .data.build import DataParts
from .data.loader import summarize
from .diagnose import describe as describe_diagnosis
from .diagnose import diagnose
from .export import export_final
from .export_check import check_merged
from .model.attention import describe_attention
from .model.kernels import (
    compile_stats,
)
from .model.load import load_model, whole_model
from .model.precision import describe as describe_precision
from .plots import history_from_tensorboard, training_curves
from .trainer.collective import main_decides
from .trainer.loop import LoopOutcome, LoopParts
from .trainer.rundir import write_skipped
from .trainer.schedule import warmup_steps
from .trainer.strategy import describe as describe_strategy
from .trainer.strategy import describe_groups

log = logging.getLogger("distsft")


def log_start(cfg: Config, acc, plan, d: DataParts, model, trainable: int, n_params: int, out: Path) -> None:
    data = d.data
    log.info("batch: %s", plan.describe())
    log.info("strategy: %s on %d %s process(es)%s", describe_strategy(cfg.parallel), acc.num_processes, acc.device.type,
             describe_groups(cfg.parallel, acc.num_processes))
    log.info("precision: %s (trainer.precision=%s, model.dtype=%s)", describe_precision(cfg), cfg.trainer.precision,
             cfg.model.dtype)
    log.info("attention: %s", describe_attention(model.config._attn_implementation, cfg.data.mode))
    log.info(summarize("train", data.train_stats))
    if data.eval_stats:
        log.info(summarize("eval", data.eval_stats))
    if data.skipped.rows:
        log.warning("skipped %d bad rows %s; see %s", len(data.skipped.rows), data.skipped.counts(),
                    out / "skipped_rows.jsonl")
        write_skipped(acc, out, data.skipped)
    log.info("steps: %d per epoch, %d in all, %d warmup", d.loader.steps_per_epoch, d.total,
             warmup_steps(cfg.schedule, d.total))
    log.info("parameters: trainable %s / %s = %.2f%%", f"{trainable:,}", f"{n_params:,}", 100 * trainable / n_params)


def finish(cfg: Config, acc, plan, d, parts: LoopParts, outcome: LoopOutcome, counts: tuple[int, int],
            t0: float) -> dict:
    """After the loop: the summary (compile statistics too), the export, summary.json, the last log lines and
    curves.png."""
    out, model, tokenizer, state = parts.output_dir, parts.model, parts.tokenizer, parts.state
    prov = parts.provenance
    summary = _summary(cfg, plan, d, parts, outcome, *counts)
    if cfg.model.compile:
        summary["compile"] = c = compile_stats()
        breaks = c["graph_breaks"]
        log.log(logging.WARNING if breaks else logging.INFO, "compile: %d graphs, %d graph breaks%s", c["graphs"],
                breaks, " (parts of the layers ran eagerly; TORCH_LOGS=graph_breaks shows where)" if breaks else "")
    if outcome.status in ("finished", "early_stopped") and cfg.export.enabled:
        summary.update(_export(cfg, acc, model, tokenizer, out, parts.resolved_config, outcome, prov,
                               parts.eval_batches))
    summary["wall_time_s"] = time.time() - t0
    main_decides(acc, lambda: (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n"),
                 f"writing {out / 'summary.json'}")
    if acc.is_main_process:
        log.info("done: %s after %d steps, train loss %s, eval loss %s, %.1fs", summary["status"],
                 state.step, summary["final_train_loss"], summary["final_eval_loss"], summary["wall_time_s"])
        log.info(describe_diagnosis(summary["diagnosis"]))
        if cfg.logging.plot:
            history = history_from_tensorboard(out / "tensorboard") or outcome.history
            log.info("curves: %s", training_curves(history, out / "curves.png"))
    return summary


def _summary(cfg: Config, plan, d: DataParts, parts: LoopParts, outcome: LoopOutcome, trainable: int,
             n_params: int) -> dict:
    h, st, data = outcome.history, parts.state, d.data
    return {"status": outcome.status, "steps": st.step, "total_steps": d.total,
            "skipped_steps": outcome.skipped_steps, "loss_spikes": outcome.loss_spikes,
            "best_eval": outcome.best_eval,
            "diagnosis": diagnose(h["train_loss"], h["eval_loss"], cfg.diagnosis.bands, len(parts.tokenizer)),
            "provenance": parts.provenance,
            "tokens": st.tokens, "supervised_tokens": st.supervised_tokens,
            "final_train_loss": _last(h["train_loss"]), "final_eval_loss": _last(h["eval_loss"]),
            "train_loss_history": h["train_loss"], "eval_loss_history": h["eval_loss"],
            "batch": plan.__dict__, "strategy": describe_strategy(cfg.parallel),
            "precision": describe_precision(cfg),
            "parameters": {"trainable": trainable, "total": n_params},
            "data": {"train": data.train_stats.as_dict(),
                     "eval": data.eval_stats.as_dict() if data.eval_stats else None,
                     "skipped_rows": data.skipped.counts(), "cache_hit": data.cache_hit,
                     "prepare_seconds": round(data.seconds, 3)}}


def _export(cfg: Config, acc, model, tokenizer, out: Path, resolved: dict, outcome: LoopOutcome, prov: dict,
            eval_batches=None) -> dict:
    """final/ (the fp32 masters of the last step, or of the best eval); a merged export is scored again on the
    eval split against the trained model's eval loss at that step (export_check)."""
    extra = {}
    evals = outcome.history.get("eval_loss") or []
    trained_loss = evals[-1][1] if evals else None  # the loop evaluates the last step (or stops early at an eval)
    if cfg.trainer.export_best and outcome.best_eval:
        acc.load_state(str(out / "checkpoints" / "best"))  # export the best eval, not the last step
        extra["exported_step"] = outcome.best_eval["step"]
        trained_loss = outcome.best_eval["loss"]

    def base_loader():  # the un-quantised base, for export.mode=merged (rank 0 only: no zero.Init)
        with whole_model(acc):
            return load_model(cfg.model, cfg.trainer.seed)

    final = export_final(acc, model, tokenizer, out, resolved, cfg.export.mode, base_loader, prov,
                         dtype=cfg.model.dtype)
    extra["final_dir"] = str(final)
    if cfg.export.mode == "merged":
        extra["export_check"] = check_merged(cfg, acc, final, eval_batches, trained_loss)
    return extra


def _last(history: list) -> float | None:
    return history[-1][1] if history else None
