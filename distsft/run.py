"""The whole pipeline: config -> data -> model -> Accelerate loop -> export -> summary."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from accelerate.utils import set_seed
from omegaconf import OmegaConf

from .batch import resolve_batch
from .checks import check_device_combinations, check_paths
from .config import Config, ConfigError
from .data.cachekey import cache_root
from .data.loader import StepLoader, eval_batches, pack, summarize
from .data.prepare import prepare
from .data.templates import end_of_turn_id
from .diagnose import describe as describe_diagnosis
from .diagnose import diagnose
from .export import export_final
from .export_check import check_merged
from .model import sequence
from .model.attention import configured_attention, describe_attention
from .model.fp8 import apply_fp8
from .model.head import install as install_head
from .model.kernels import (
    apply_kernels,
    compile_layers,
    compile_stats,
    fused_loss,
    resolve_kernels,
)
from .model.load import load_model, load_tokenizer, whole_model
from .model.moe import mark_z3_leaf_modules
from .model.offload import apply_checkpoint_offload
from .model.params import count_parameters
from .model.peft import apply_peft, quantization_config
from .model.precision import check_master_weights, load_dtype
from .model.precision import describe as describe_precision
from .model.tiling import apply_tiled_mlp
from .plots import history_from_tensorboard, training_curves
from .provenance import provenance
from .trainer import checkpoint
from .trainer.accelerator import build_accelerator, launched_world_size
from .trainer.collective import cache_builder, main_decides
from .trainer.lock import RunLock
from .trainer.loop import LoopOutcome, LoopParts, train
from .trainer.metrics import model_flops, peak_flops
from .trainer.optim import build_optimizer
from .trainer.optim import describe as describe_optimizer
from .trainer.reshape import restore, route
from .trainer.samples import with_sample_prompts
from .trainer.schedule import build_scheduler, warmup_steps
from .trainer.strategy import describe as describe_strategy
from .trainer.strategy import describe_groups
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
                         cfg.trainer.global_batch_size, launched_world_size(), cfg.parallel.sp_size)
    acc = build_accelerator(cfg.parallel, cfg.trainer, plan, accelerate_trackers(cfg.logging.trackers))
    set_seed(cfg.trainer.seed)  # python, numpy, torch on every process (dropout, workers)
    if not acc.is_main_process:  # rank 0 speaks
        logging.getLogger().setLevel(logging.WARNING)
    tokenizer = load_tokenizer(cfg.model)
    d = build_data(cfg, acc, tokenizer, plan)
    agree_on_data(acc, d)  # every rank trains on the same tokens in the same steps, or none starts
    model, trainable, n_params = build_model(cfg, acc)
    out = Path(cfg.output_dir)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    resume_from = _resume_target(acc, cfg, out, resolved, d.data.fingerprint)  # checked before anything is written
    with _locked(acc, out):  # one trainer per output_dir (every rank stops if it is taken)
        _setup_run_dir(acc, out, resolved)  # only now, with data, config, checkpoint and lock known to be good
        _log_start(cfg, acc, plan, d, model, trainable, n_params, out)
        model, optimizer, scheduler, state = _training_objects(cfg, acc, model, d.total, resume_from)
        prov = provenance(d.data.fingerprint)
        parts = LoopParts(acc, model, optimizer, scheduler, d.loader, d.eval_batches, state, d.total, out, resolved,
                          flops=model_flops(acc.unwrap_model(model), trainable, n_params),
                          peak_flops=peak_flops(cfg.logging.peak_flops), provenance=prov, tokenizer=tokenizer)
        dog = Watchdog.for_run(acc, cfg.trainer.hang_timeout, out)  # a silent or stuck rank ends the job
        try:
            outcome = train(parts, cfg.trainer, _logging_for(cfg))
        finally:
            if dog is not None:
                dog.stop()
        summary = _finish(cfg, acc, plan, d, parts, outcome, (trainable, n_params), t0)
        acc.wait_for_everyone()  # every rank leaves together: no rank tears down a group another still uses
        acc.end_training()
        _close_run_log()
    return RunResult(summary, parts.model, tokenizer)


def _logging_for(cfg: Config):
    if cfg.parallel.sequence_parallel and cfg.logging.sample_every:  # generation would run a slice as a whole row
        log.info("samples: off under sequence parallelism (logging.sample_every=%d ignored)", cfg.logging.sample_every)
        return replace(cfg.logging, sample_every=0)
    return with_sample_prompts(cfg.logging, cfg.data)


@contextmanager
def _locked(acc, out: Path):
    """Hold output_dir's run lock (taken by the main process; every rank stops if another run holds it)."""
    lock = RunLock(out) if acc.is_main_process else None
    main_decides(acc, lambda: lock.acquire(), f"taking the run lock of {out}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


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


def _finish(cfg: Config, acc, plan, d, parts: LoopParts, outcome: LoopOutcome, counts: tuple[int, int],
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


@dataclass
class DataParts:
    data: object  # data.prepare.Prepared
    loader: StepLoader
    eval_batches: list | None
    total: int


def build_data(cfg: Config, acc, tokenizer, plan) -> DataParts:
    # one process builds the token cache (or finds it) for every node that sees it; the others wait for it and
    # map the same files (data.prepare_timeout bounds the wait)
    data = prepare(cfg.data, tokenizer, cfg.model.tokenizer or cfg.model.name_or_path,
                   builder=cache_builder(acc, cache_root(cfg.data)) if cfg.data.cache else acc.is_local_main_process)
    use_template(tokenizer, data.template, cfg.data.chat_template)
    loader = StepLoader(data.train, pack(data.train, cfg.data, data.train_stats), plan, acc.process_index, cfg.data,
                        tokenizer.pad_token_id, pin_memory=acc.device.type == "cuda")
    ev = None
    if data.eval is not None:
        ev = eval_batches(data.eval, pack(data.eval, cfg.data, data.eval_stats), plan.micro_batch_size,
                          acc.process_index, acc.num_processes, cfg.data, tokenizer.pad_token_id, plan.sp_size)
    return DataParts(data, loader, ev or None, loader.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps))


def agree_on_data(acc, d: DataParts) -> None:
    """Every rank prepared (or mapped) the same data: the same fingerprint (files, options, versions), steps per
    epoch and steps in all. A rank that differs (another token cache, other files on its node) is named."""
    if acc.num_processes == 1:
        return
    import socket
    from collections import Counter

    from accelerate.utils import gather_object

    mine = (d.data.fingerprint, d.loader.steps_per_epoch, d.total)
    every = gather_object([(mine, socket.gethostname())])  # all-gather: every rank judges the same list
    common = Counter(v for v, _ in every).most_common(1)[0][0]
    odd = [(r, v, host) for r, (v, host) in enumerate(every) if v != common]
    if odd:
        ranks = "; ".join(f"rank {r} ({host}): data fingerprint {v[0]}, {v[1]} steps per epoch, {v[2]} in all"
                          for r, v, host in odd)
        raise ConfigError(f"the ranks did not prepare the same data: {ranks}; the others: data fingerprint "
                          f"{common[0]}, {common[1]} steps per epoch, {common[2]} in all (another token cache or "
                          "other data files on that node: every node must see the same data.train_files, and "
                          "data.cache should be on a shared filesystem or rebuilt on each node)")


def build_model(cfg: Config, acc):
    """(model, trainable, total parameters): load (quantised) -> kernels -> adapters -> gradient checkpointing
    -> compiled layers."""
    cuda = acc.device.type == "cuda"
    check_device_combinations(cfg, cuda)
    model_cfg = replace(cfg.model, dtype=load_dtype(cfg))  # trainable weights are fp32 masters
    model_cfg = replace(model_cfg, attn_implementation=configured_attention(cfg, cuda))
    if cfg.parallel.sequence_parallel:  # the attention behind DeepSpeed's all-to-all gets no mask
        model_cfg = replace(model_cfg, attn_implementation=sequence.attention(model_cfg.attn_implementation))
    with whole_model(acc, cfg.model.init == "config"):
        model = load_model(model_cfg, cfg.trainer.seed, cuda=cuda, device=acc.device.index if cuda else "cpu",
                           quantization=quantization_config(cfg.peft, cfg.parallel.zero3))
    if cfg.parallel.zero3:  # before accelerate.prepare: DeepSpeed reads the flags when it wraps the model
        mark_z3_leaf_modules(model)
    if cfg.parallel.sequence_parallel:
        sequence.hand_to_accelerate(acc, model, cfg.parallel.sp_size)
    if cfg.peft.method != "none" and cfg.model.init == "config":
        log.warning("peft=%s on a randomly initialised base (model.init=config): adapters adapt what a pretrained "
                    "model knows, a random one knows nothing and the loss barely falls; for the embedded model use "
                    "model=tiny_base (pretrained)", cfg.peft.method)
    kernels, why = resolve_kernels(cfg.model.kernels, cuda, cfg.parallel.shards_parameters, model.config.model_type,
                                   cfg.parallel.sequence_parallel)
    log.info("kernels: %s (model.kernels=%s: %s)", kernels, cfg.model.kernels, why)
    model = apply_kernels(model, kernels)  # before adapters: Liger patches the base's layers
    model = apply_peft(model, cfg.peft, cfg.model.gradient_checkpointing, cfg.model.checkpoint_every,
                       bf16_autocast=cfg.trainer.precision == "bf16", zero3=cfg.parallel.zero3)
    if cfg.model.fp8:  # after the adapters: they mark what is frozen
        frozen, trainable = apply_fp8(model)
        log.info("fp8: %d frozen and %d trainable linear layers of the decoder run FP8 matmuls (model.fp8; %s)",
                 frozen, trainable, "FP8 tensor cores" if cuda else "emulated on CPU: slow, for checking")
    if cfg.model.tiled_mlp_shards:
        if acc.num_processes > 1 and cfg.parallel.strategy != "deepspeed":
            raise ConfigError(f"model.tiled_mlp_shards with parallel={cfg.parallel.strategy} on {acc.num_processes} "
                              "processes: its chunks accumulate gradients inside one backward, which only DeepSpeed "
                              "is told about; use parallel=zero1|zero2|zero3, or model.tiled_mlp_shards=0")
        log.info("tiled MLP: %d decoder MLPs in %d chunks of the sequence (model.tiled_mlp_shards)",
                 apply_tiled_mlp(model, cfg.model.tiled_mlp_shards), cfg.model.tiled_mlp_shards)
    if cfg.model.offload_checkpoints:
        log.info("checkpoint offload: the inputs of %d recomputed decoder layers are kept in host memory "
                 "(model.offload_checkpoints)", apply_checkpoint_offload(model)[0])
    check_master_weights(model, cfg.parallel.strategy == "deepspeed", cfg.trainer.precision)
    if cfg.trainer.loss_head == "supervised" and not fused_loss(model):  # Liger's fused loss builds no logits
        log.info("loss head: %s (trainer.loss_chunk=%d)", install_head(model, cfg.trainer.loss_chunk),
                 cfg.trainer.loss_chunk)
    if cfg.model.compile:  # last: the compiled layers hold the kernels and adapters
        compile_layers(model)
    return (model, *count_parameters(model))


def _log_start(cfg: Config, acc, plan, d: DataParts, model, trainable: int, n_params: int, out: Path) -> None:
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
        _write_skipped(acc, out, data.skipped)
    log.info("steps: %d per epoch, %d in all, %d warmup", d.loader.steps_per_epoch, d.total,
             warmup_steps(cfg.schedule, d.total))
    log.info("parameters: trainable %s / %s = %.2f%%", f"{trainable:,}", f"{n_params:,}", 100 * trainable / n_params)


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


def use_template(tokenizer, template: str, name: str | None) -> None:
    """Train and export with the same template. A built-in template's end-of-turn becomes the tokenizer's eos,
    which the export adds to the base's eos ids (generation_config.json): generate() stops at the end of a turn."""
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
    def setup():
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), out / "config.yaml")
        _close_run_log()
        handler = _RunLog(out / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        logging.getLogger().addHandler(handler)
        # a save that crashed (before or after its rename, without COMPLETE): nothing may trust it
        for gone in checkpoint.remove_incomplete(out / "checkpoints"):
            log.warning("removed %s: an unfinished checkpoint (no %s marker) of an earlier run", gone,
                        checkpoint.MARKER)

    main_decides(acc, setup, f"setting up {out}")  # (its broadcast is the barrier: the run directory exists)
    # Accelerate logs every file of every checkpoint at INFO; keep the run log readable
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _resume_target(acc, cfg: Config, out: Path, resolved: dict, fingerprint: str) -> Path | None:
    """The intact checkpoint to resume from (None: start fresh), checked for compatibility."""
    # every rank checks its share of the checkpoints' files and all reach the same answer
    ckpt = checkpoint.find_resume(cfg.trainer.resume, out / "checkpoints", acc)
    if ckpt is not None:
        checkpoint.check_compatible(ckpt, resolved, fingerprint, cfg.trainer.resume_force)
        route(ckpt, cfg.parallel, acc.num_processes)  # a change of strategy the engines cannot load: refused now
    return ckpt
