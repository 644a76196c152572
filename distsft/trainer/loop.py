"""Trainer: the training loop (custom, on ``accelerate.Accelerator``) around ``step.train_step``.

    for each optimizer step:
        train_step (step.py): the loss contract, backward, clip, optimizer and scheduler step
        guards.judge, one step later: the host reads its flags (non-finite? stop requested?)
        every log_every: the metrics window is read (one collective), scalars written (main process)
        every eval_every: eval loss ; every save_every: checkpoint

``LoopParts`` is what the loop is given; ``_Loop`` is its running state (reporter, guards, window,
history); ``train`` returns a ``LoopOutcome``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .async_save import Background
from .guards import Guards
from .metrics import Reporter, Window
from .preempt import SaveClock, StopRequest
from .samples import generate_samples
from .step import evaluate, train_step
from .watchdog import progress


@dataclass
class LoopParts:
    """What the loop is given (nothing in it changes but ``state``, the checkpointed step counters)."""

    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    loader: object  # data.loader.StepLoader
    eval_batches: object | None  # data.loader.EvalBatches
    state: checkpoint.TrainState
    total_steps: int
    output_dir: Path
    resolved_config: dict
    flops: tuple[float, float] = (0.0, 0.0)  # per real token, per (document length)^2
    peak_flops: float | None = None
    provenance: dict | None = None
    tokenizer: object = None


@dataclass
class LoopOutcome:
    status: str  # finished | early_stopped | stopped | preempted
    skipped_steps: list[int]
    loss_spikes: list[int]
    best_eval: dict | None
    history: dict = field(default_factory=dict)  # logged (step, value) lists: train_loss, eval_loss, lr, grad_norm


def train(p: LoopParts, trainer_cfg, logging_cfg) -> LoopOutcome:
    """Train from ``p.state.step`` to the end (or a stop); -> how it ended and what it logged."""
    loop = _Loop(p, trainer_cfg, logging_cfg)
    st, status = p.state, "finished"
    stop_at = min(p.total_steps, st.step + trainer_cfg.stop_after) if trainer_cfg.stop_after else p.total_steps
    p.model.train()
    try:
        while st.step < stop_at:
            epoch, in_epoch = divmod(st.step, p.loader.steps_per_epoch)
            fetched = time.perf_counter()
            progress("data", st.step)
            for micro_batches in p.loader.steps(epoch, in_epoch):
                loop.window.data_time += time.perf_counter() - fetched  # the host waiting for its batches
                ended = loop.step(micro_batches, stop_at)
                if ended:
                    stop_at, status = st.step, ended
                if st.step >= stop_at:
                    break
                fetched = time.perf_counter()
                progress("data", st.step)
    except BaseException:
        if loop.background is not None:
            loop.background.settle()  # the checkpoint in flight completes, if it can, before the error ends the run
        raise
    finally:
        loop.close()
    if loop.background is not None:
        progress("checkpoint")
        try:
            loop.background.wait(p.accelerator)  # the last checkpoint (a preemption's too) is complete before we go on
            if loop.background.last:
                loop.clock.saved(*loop.background.last)
        finally:
            loop.background.close()
    loop.judge(0)  # a step still pending (an early stop between log steps): skipped_steps is complete
    if st.step >= p.total_steps or status == "early_stopped":
        if p.eval_batches and not (trainer_cfg.eval_every and st.step % trainer_cfg.eval_every == 0):
            loop.eval()
        status = "early_stopped" if status == "early_stopped" else "finished"  # a stop at the last step finished
    elif status != "preempted":
        status = "stopped"
    return LoopOutcome(status, **loop.guards.outcome(), history=loop.history)


class _Loop:
    """The loop's running state and what it does after each step."""

    def __init__(self, p: LoopParts, trainer_cfg, logging_cfg):
        acc, st = p.accelerator, p.state
        self.p, self.cfg, self.log_cfg = p, trainer_cfg, logging_cfg
        self.rep = Reporter(acc, p.output_dir, p.total_steps, st.step, logging_cfg, p.resolved_config)
        self.stop_request = StopRequest(p.output_dir, acc.is_main_process)
        self.guards = Guards(trainer_cfg, acc.device)
        self.guards.load_state_dict(st.guards)  # as the checkpoint we resumed from left them (if any)
        self.history = {"train_loss": [], "eval_loss": [], "lr": [], "grad_norm": []}
        self.history.update({k: [tuple(x) for x in v] for k, v in st.history.items()})
        self.window = Window(acc.device)
        self.clock = SaveClock(acc.is_main_process)  # a checkpoint longer than the launcher's SIGTERM grace: said
        self.background = Background(acc, p.output_dir, trainer_cfg.async_stage, p.model, p.optimizer) \
            if trainer_cfg.async_save else None

    def step(self, micro_batches: list[dict], stop_at: int) -> str | None:
        """One optimizer step and what follows it; why to stop now, if so."""
        p, st = self.p, self.p.state
        lr = p.scheduler.get_last_lr()[0]
        progress("forward/backward", st.step + 1)
        res = train_step(p.model, micro_batches, p.accelerator, p.optimizer, p.scheduler, self.cfg.max_grad_norm,
                         self.stop_request.local())
        st.step += 1
        ids = [mb["example_ids"] for mb in micro_batches]
        self.guards.record(st.step, res, ids)
        self.window.add(st.step, res, ids)
        self.rep.step()
        stop = self.judge(res.lag)
        saving = self.cfg.save_every and st.step % self.cfg.save_every == 0 or st.step == stop_at
        if st.step % self.log_cfg.log_every == 0 or saving or stop:  # a checkpoint holds exact token counts
            stop |= self.judge(0)  # every step so far judged: exact skipped steps, and a stop seen before saving
            self.log_window(lr)
        paused = time.perf_counter()
        if stop:  # preemption: the signal's grace period is for the checkpoint (no eval, no samples first)
            self.rep.line(f"stop requested: writing a checkpoint at step {st.step} and exiting")
            self.save(self.cfg.save_total_limit)
            self.window.pause(time.perf_counter() - paused)
            return "preempted"
        early = self.eval_and_samples()
        if saving or early:
            self.save(self.cfg.save_total_limit)
        self.window.pause(time.perf_counter() - paused)
        return "early_stopped" if early else None

    def judge(self, lag: int) -> bool:
        return self.guards.judge(lag, self.origins, self.p.accelerator.process_index)

    def eval_and_samples(self) -> bool:
        """Eval and sample generation when due; True when early stopping says stop."""
        p, step, early = self.p, self.p.state.step, False
        if p.eval_batches and self.cfg.eval_every and step % self.cfg.eval_every == 0:
            progress("eval")
            self.eval()
            early = self.guards.early.should_stop(p.accelerator)
            if early:
                best = self.guards.early
                self.rep.line(f"early stop at step {step}: eval loss has not improved for {best.bad_evals} evals "
                              f"(best {best.best:.4f} at step {best.best_step})")
        every = self.log_cfg.sample_every
        if every and (step % every == 0 or step == p.total_steps):
            progress("samples")
            samples = generate_samples(p.model, p.tokenizer, self.log_cfg.sample_prompts,
                                       self.log_cfg.sample_max_new_tokens, p.accelerator)
            self.rep.samples(step, samples)
            self.rep.line(f"step {step} samples: " + " | ".join(f"{q!r} -> {a!r}" for q, a in samples))
        return early

    def log_window(self, lr: float) -> None:
        p, st = self.p, self.p.state
        w = self.window.read(p.accelerator)
        skipped = self.guards.bad_steps.skipped
        if self.guards.spikes.enabled:  # judged here, in step order, rather than with a sync in every step
            for (step, ids), step_loss in zip(w.steps_seen, w.step_losses):
                if step not in skipped:
                    self.guards.spikes.check(step, step_loss, lambda ids=ids: self.origins(ids),
                                             p.accelerator.process_index)
        st.tokens += int(w.counts["tokens"])
        st.supervised_tokens += int(w.counts["supervised"])
        for key, value in (("train_loss", w.loss), ("lr", lr), ("grad_norm", w.grad_norm)):
            self.history[key].append((st.step, value))
        scalars = w.scalars(lr, len(skipped), p.flops, p.peak_flops, p.accelerator.num_processes)
        self.rep.scalars(st.step, scalars)
        self.rep.line(w.line(st.step, p.total_steps, scalars))
        self.window.reset()

    def eval(self) -> None:
        p, step = self.p, self.p.state.step
        loss = evaluate(p.model, p.eval_batches, p.accelerator)
        self.history["eval_loss"].append((step, loss))
        values = {"eval/loss": loss}
        if self.history["train_loss"]:
            values["eval/gap"] = loss - self.history["train_loss"][-1][1]
        self.rep.scalars(step, values)
        self.rep.line(f"step {step} eval loss {loss:.4f}")
        if self.guards.early.update(step, loss) and self.cfg.export_best:
            self.save(0, name="best")

    def save(self, keep: int, name: str | None = None) -> None:
        p = self.p
        progress("checkpoint")
        p.state.guards = self.guards.state_dict()
        p.state.history = self.history
        t0 = time.perf_counter()
        final = checkpoint.save(p.accelerator, p.output_dir / "checkpoints", p.state.step, p.resolved_config, keep,
                                name=name, provenance=p.provenance, background=self.background)
        if self.background is None or not self.background.writing:
            self.clock.saved(final.name, time.perf_counter() - t0)
        elif self.background.last:  # the previous one, from staging to COMPLETE (waited for by this save)
            self.clock.saved(*self.background.last)

    def origins(self, example_ids: list[torch.Tensor]) -> list[str]:
        """'file row N' of every example of a step (its micro-batches' example ids)."""
        store = self.p.loader.store
        return [store.origin(int(i)) for ids in example_ids for i in ids]

    def close(self) -> None:
        self.stop_request.restore()
        self.rep.close()
