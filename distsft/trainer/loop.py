"""Trainer stage 5b: the training loop (custom, on ``accelerate.Accelerator``) around ``step.train_step``.

    for each optimizer step:
        train_step (step.py): the loss contract, backward, clip, optimizer and scheduler step
        one step later: the host reads its flags (non-finite? stop requested?)
        every log_every: reduce loss + counts, write scalars (main process)
        every eval_every: eval loss ; every save_every: checkpoint
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .guards import Guards
from .metrics import Reporter, peak_memory_gb
from .preempt import StopRequest
from .samples import as_markdown, generate_samples
from .step import COUNTED, StepResult, evaluate, train_step


@dataclass
class LoopParts:
    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    loader: object  # data.loader.StepLoader
    eval_batches: list | None
    state: checkpoint.TrainState
    total_steps: int
    output_dir: Path
    resolved_config: dict
    flops: tuple[float, float] = (0.0, 0.0)  # per real token, per (document length)^2
    peak_flops: float | None = None
    history: dict = field(default_factory=lambda: {"train_loss": [], "eval_loss": [], "lr": [], "grad_norm": []})
    guards: Guards | None = None  # made by train(), from the trainer config (and the checkpoint, at a resume)
    provenance: dict | None = None
    tokenizer: object = None


def train(p: LoopParts, trainer_cfg, logging_cfg) -> dict:
    acc, st = p.accelerator, p.state
    rep = Reporter(acc.is_main_process, p.output_dir, p.total_steps, st.step,
                   logging_cfg.tensorboard, logging_cfg.progress_bar)
    stop = StopRequest(p.output_dir, acc.is_main_process)
    p.guards = Guards(trainer_cfg, acc.device)
    p.guards.load_state_dict(st.guards)  # as the checkpoint we resumed from left them (if any)
    p.history.update({k: [tuple(x) for x in v] for k, v in st.history.items()})
    window = _Window(acc.device)
    outcome = "finished"
    stop_at = min(p.total_steps, st.step + trainer_cfg.stop_after) if trainer_cfg.stop_after else p.total_steps
    p.model.train()
    try:
        while st.step < stop_at:
            epoch, in_epoch = divmod(st.step, p.loader.steps_per_epoch)
            fetched = time.perf_counter()
            for micro_batches in p.loader.steps(epoch, in_epoch):
                window.data_time += time.perf_counter() - fetched  # the host waiting for its batches
                lr = p.scheduler.get_last_lr()[0]
                res = train_step(p.model, micro_batches, acc, p.optimizer, p.scheduler, trainer_cfg.max_grad_norm,
                                 stop.local())
                st.step += 1
                ids = [mb["example_ids"] for mb in micro_batches]
                p.guards.verdicts.push(st.step, res.flags, (ids, res.applied_anyway))
                window.add(st.step, res, ids)
                rep.step()
                ended = _after_step(p, rep, window, lr, trainer_cfg, logging_cfg, stop_at, res.lag)
                if ended:
                    stop_at, outcome = st.step, ended
                if st.step >= stop_at:
                    break
                fetched = time.perf_counter()
    finally:
        stop.restore()
        rep.close()
    _judge(p, 0)  # a step still pending (an early stop between log steps): skipped_steps is complete
    if st.step >= p.total_steps or outcome == "early_stopped":
        if p.eval_batches and not (trainer_cfg.eval_every and st.step % trainer_cfg.eval_every == 0):
            _log_eval(p, rep, trainer_cfg)
        outcome = "early_stopped" if outcome == "early_stopped" else "finished"
    elif outcome != "preempted":
        outcome = "stopped"
    return {"status": outcome, **p.guards.outcome()}


def _judge(p: LoopParts, lag: int) -> bool:
    """Judge the steps whose flags are due (all but the last ``lag``); True if a stop was requested
    (the same on every rank: it came through the step's all-reduce)."""
    stop = False
    for step, finite, stop_requested, (ids, applied) in p.guards.verdicts.ready(lag):
        p.guards.bad_steps.check(step, finite, lambda ids=ids: _origins(p, ids), p.accelerator.process_index, applied)
        stop |= stop_requested
    return stop


def _after_step(p: LoopParts, rep: Reporter, window, lr: float, trainer_cfg, logging_cfg, stop_at: int,
                lag: int) -> str | None:
    """Judging, logging, eval, early stopping and checkpoints after a step; why to stop now, if so."""
    st = p.state
    stop = _judge(p, lag)
    saving = trainer_cfg.save_every and st.step % trainer_cfg.save_every == 0 or st.step == stop_at
    if st.step % logging_cfg.log_every == 0 or saving or stop:  # a checkpoint holds exact token counts
        stop |= _judge(p, 0)  # every step so far judged: exact skipped steps, and a stop seen before saving
        _log_window(p, rep, window, lr, p.guards.bad_steps.skipped)
    if stop:
        rep.line(f"stop requested: writing a checkpoint at step {st.step} and exiting")
        saving = True
    t_pause = time.perf_counter()  # eval and checkpoints do not count as training time
    early = False
    if p.eval_batches and trainer_cfg.eval_every and st.step % trainer_cfg.eval_every == 0:
        _log_eval(p, rep, trainer_cfg)
        early = p.guards.early.should_stop(p.accelerator)
        if early:
            best = p.guards.early
            rep.line(f"early stop at step {st.step}: eval loss has not improved for {best.bad_evals} evals "
                     f"(best {best.best:.4f} at step {best.best_step})")
    if logging_cfg.sample_every and (st.step % logging_cfg.sample_every == 0 or st.step == p.total_steps):
        samples = generate_samples(p.model, p.tokenizer, logging_cfg.sample_prompts,
                                   logging_cfg.sample_max_new_tokens, p.accelerator)
        rep.text(st.step, "samples", as_markdown(samples))
        rep.line(f"step {st.step} samples: " + " | ".join(f"{q!r} -> {a!r}" for q, a in samples))
    if saving or early:
        _save(p, trainer_cfg.save_total_limit)
    window.t0 += time.perf_counter() - t_pause
    return "preempted" if stop else "early_stopped" if early else None


def _save(p: LoopParts, keep: int, name: str | None = None) -> None:
    p.state.guards = p.guards.state_dict()
    p.state.history = p.history
    checkpoint.save(p.accelerator, p.output_dir / "checkpoints", p.state.step, p.resolved_config, keep, name=name,
                    provenance=p.provenance)


def _origins(p: LoopParts, example_ids: list[torch.Tensor]) -> list[str]:
    """'file row N' of every example of a step (its micro-batches' example ids)."""
    store = p.loader.store
    return [store.origin(int(i)) for ids in example_ids for i in ids]


class _Window:
    """Accumulates step results on the device; read back (one host sync) only at log steps."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.losses: list[torch.Tensor] = []  # per step: this rank's share of the step loss (on the device)
        self.steps_seen: list[tuple[int, list]] = []  # per step: (step, example ids)
        self.counts = torch.zeros(len(COUNTED) + 1, device=self.device, dtype=torch.float64)
        self.grad_norm = None
        self.data_time = 0.0  # seconds the host waited for the DataLoader
        self.t0 = time.perf_counter()

    @property
    def steps(self) -> int:
        return len(self.losses)

    def add(self, step: int, res: StepResult, example_ids: list):
        self.losses.append(res.loss_sum)
        self.steps_seen.append((step, example_ids))
        self.counts += res.counts.double()
        self.grad_norm = res.grad_norm


def _log_window(p: LoopParts, rep: Reporter, w: _Window, lr: float, skipped: list[int]) -> None:
    acc, st = p.accelerator, p.state
    # one collective and one host read per window: every step's loss summed over ranks
    step_losses = acc.reduce(torch.stack(w.losses).float(), reduction="sum").tolist()
    loss = sum(step_losses) / w.steps  # mean step loss of the window
    if p.guards.spikes.enabled:  # judged here, in step order, rather than with a sync in every step
        for (step, ids), step_loss in zip(w.steps_seen, step_losses):
            if step not in skipped:
                p.guards.spikes.check(step, step_loss, lambda ids=ids: _origins(p, ids), acc.process_index)
    sup, real, attn_sq, cells, _, _ = w.counts.tolist()
    dt = time.perf_counter() - w.t0
    st.tokens += int(real)
    st.supervised_tokens += int(sup)
    grad_norm = float(w.grad_norm)
    p.history["train_loss"].append((st.step, loss))
    p.history["lr"].append((st.step, lr))
    p.history["grad_norm"].append((st.step, grad_norm))
    scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
               "train/tokens_per_s": real / dt, "train/supervised_tokens_per_s": sup / dt,
               "train/step_time": dt / w.steps, "train/data_time": w.data_time / w.steps,
               "train/supervised_tokens": sup / w.steps,
               "train/packing_efficiency": real / max(cells, 1), "train/peak_memory_gb": peak_memory_gb(),
               "train/skipped_steps": len(skipped)}
    mfu = ""
    if p.peak_flops:
        flops = p.flops[0] * real + p.flops[1] * attn_sq
        scalars["train/mfu"] = flops / (dt * p.peak_flops * acc.num_processes)
        mfu = f" mfu {scalars['train/mfu']:.1%}"
    rep.scalars(st.step, scalars)
    rep.line(f"step {st.step}/{p.total_steps} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
             f"tok/s {real / dt:,.0f} sup_tok/s {sup / dt:,.0f}{mfu}")
    w.reset()


def _log_eval(p: LoopParts, rep: Reporter, trainer_cfg) -> None:
    loss = evaluate(p.model, p.eval_batches, p.accelerator)
    p.history["eval_loss"].append((p.state.step, loss))
    values = {"eval/loss": loss}
    if p.history["train_loss"]:
        values["eval/gap"] = loss - p.history["train_loss"][-1][1]
    rep.scalars(p.state.step, values)
    rep.line(f"step {p.state.step} eval loss {loss:.4f}")
    if p.guards.early.update(p.state.step, loss) and trainer_cfg.export_best:
        _save(p, 0, name="best")
