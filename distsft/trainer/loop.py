"""Trainer stage 5: the training loop (custom, on ``accelerate.Accelerator``).

    for each optimizer step:
        count supervised tokens of all its micro-batches, all-reduce  -> N
        for each micro-batch (no gradient sync but on the last):
            loss = sum token CE / N * world_size ; backward
        clip, optimizer step, scheduler step
        every log_every: reduce loss + counts, write scalars (main process)
        every eval_every: eval loss ; every save_every: checkpoint
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.collate import model_inputs
from ..model.attention import VARLEN
from . import checkpoint
from .loss import token_ce_sum
from .metrics import Reporter
from .preempt import StopRequest


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's share of the step loss (sum over ranks = step loss)
    grad_norm: torch.Tensor
    counts: torch.Tensor  # [supervised, real] tokens of the step and stop requests, all ranks


def forward_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # use_cache=False and no attention_mask on packed rows: that is what keeps documents apart
    varlen = getattr(model, "module", model).config._attn_implementation == VARLEN
    logits = model(**model_inputs(batch, varlen), use_cache=False).logits
    return token_ce_sum(logits, batch["labels"])


def accumulate_gradients(model, micro_batches: list[dict], accelerator,
                         stop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward every micro-batch of one optimizer step under the loss contract.

    Returns (this rank's share of the step loss, [supervised, real, stop requests] of all ranks).
    """
    device = accelerator.device
    counts = torch.tensor([float(sum(int(mb["n_supervised"]) for mb in micro_batches)),
                           float(sum(int(mb["n_tokens"]) for mb in micro_batches)), stop], dtype=torch.float64)
    # one all-reduce per step: N over all micro-batches and ranks, and whether any rank must stop
    counts = accelerator.reduce(counts.to(device), reduction="sum")
    n_sup = counts[0].clamp(min=1).float()
    # DDP/ZeRO average gradients over W ranks and Accelerate/DeepSpeed divide the loss by the
    # accumulation steps A: undo both, then divide by N
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / n_sup
    total = torch.zeros((), device=device)
    for mb in micro_batches:
        # accumulate(): no gradient sync (DDP no_sync / DeepSpeed boundary) but on the last micro-batch
        with accelerator.accumulate(model):
            mb = {key: v.to(device, non_blocking=True) if key != "max_seqlen" else v for key, v in mb.items()}
            ce_sum = forward_loss_sum(model, mb)
            accelerator.backward(ce_sum * scale)
            total += ce_sum.detach()
    assert accelerator.sync_gradients, "micro-batches per step must equal the accumulation steps"
    return total / n_sup, counts


def train_step(model, micro_batches: list[dict], accelerator, optimizer, scheduler,
               max_grad_norm: float, stop: float = 0.0) -> StepResult:
    loss_share, counts = accumulate_gradients(model, micro_batches, accelerator, stop)
    # under DeepSpeed the engine has already clipped and stepped; this returns its global norm
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_share, torch.as_tensor(grad_norm, device=accelerator.device), counts)


@torch.no_grad()
def evaluate(model, batches: list[dict], accelerator) -> float:
    """Token-weighted eval loss over all ranks' shares (sum CE / supervised tokens)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    # every rank runs the same number of batches (ZeRO-3 gathers parameters collectively)
    with accelerator.autocast():
        for mb in batches:
            mb = {k: v.to(accelerator.device) if k != "max_seqlen" else v for k, v in mb.items()}
            sums[0] += forward_loss_sum(model, mb).double()
            sums[1] += (mb["labels"][:, 1:] != -100).sum()
    sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    return (sums[0] / sums[1].clamp(min=1)).item()


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
    history: dict = field(default_factory=lambda: {"train_loss": [], "eval_loss": []})


def train(p: LoopParts, trainer_cfg, logging_cfg) -> dict:
    acc, st = p.accelerator, p.state
    rep = Reporter(acc.is_main_process, p.output_dir, p.total_steps, st.step,
                   logging_cfg.tensorboard, logging_cfg.progress_bar)
    stop = StopRequest(p.output_dir, acc.is_main_process)
    preempted = False
    window = _Window(acc.device)
    stop_at = min(p.total_steps, st.step + trainer_cfg.stop_after) if trainer_cfg.stop_after else p.total_steps
    p.model.train()
    while st.step < stop_at:
        epoch, in_epoch = divmod(st.step, p.loader.steps_per_epoch)
        for micro_batches in p.loader.steps(epoch, in_epoch):
            lr = p.scheduler.get_last_lr()[0]
            res = train_step(p.model, micro_batches, acc, p.optimizer, p.scheduler, trainer_cfg.max_grad_norm,
                             stop.local())
            st.step += 1
            window.add(res)
            rep.step()
            preempted = bool(res.counts[2] > 0)  # the same on every rank: it came through the all-reduce
            if preempted:
                rep.line(f"stop requested: writing a checkpoint at step {st.step} and exiting")
                stop_at = st.step
            saving = trainer_cfg.save_every and st.step % trainer_cfg.save_every == 0 or st.step == stop_at
            if st.step % logging_cfg.log_every == 0 or saving:  # a checkpoint holds exact token counts
                _log_window(p, rep, window, lr)
            t_pause = time.perf_counter()  # eval and checkpoints do not count as training time
            if p.eval_batches and trainer_cfg.eval_every and st.step % trainer_cfg.eval_every == 0:
                _log_eval(p, rep)
            if saving:
                checkpoint.save(acc, p.output_dir / "checkpoints", st.step, p.resolved_config,
                                trainer_cfg.save_total_limit)
            window.t0 += time.perf_counter() - t_pause
            if st.step >= stop_at:
                break
    stop.restore()
    finished = st.step >= p.total_steps
    if finished and p.eval_batches and not (trainer_cfg.eval_every and st.step % trainer_cfg.eval_every == 0):
        _log_eval(p, rep)
    rep.close()
    return {"finished": finished, "preempted": preempted and not finished}


class _Window:
    """Accumulates step results on the device; read back (one host sync) only at log steps."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), device=self.device)
        self.counts = torch.zeros(3, device=self.device, dtype=torch.float64)
        self.grad_norm = None
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, res: StepResult):
        self.loss += res.loss_sum
        self.counts += res.counts.double()
        self.grad_norm = res.grad_norm
        self.steps += 1


def _log_window(p: LoopParts, rep: Reporter, w: _Window, lr: float) -> None:
    acc, st = p.accelerator, p.state
    loss = acc.reduce(w.loss.clone(), reduction="sum").item() / w.steps  # mean step loss of the window
    sup, real, _ = w.counts.tolist()
    dt = time.perf_counter() - w.t0
    st.tokens += int(real)
    st.supervised_tokens += int(sup)
    grad_norm = float(w.grad_norm)
    p.history["train_loss"].append((st.step, loss))
    rep.scalars(st.step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                          "train/tokens_per_s": real / dt, "train/supervised_tokens_per_s": sup / dt,
                          "train/step_time": dt / w.steps})
    rep.line(f"step {st.step}/{p.total_steps} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
             f"tok/s {real / dt:,.0f} sup_tok/s {sup / dt:,.0f}")
    w.reset()


def _log_eval(p: LoopParts, rep: Reporter) -> None:
    loss = evaluate(p.model, p.eval_batches, p.accelerator)
    p.history["eval_loss"].append((p.state.step, loss))
    rep.scalars(p.state.step, {"eval/loss": loss})
    rep.line(f"step {p.state.step} eval loss {loss:.4f}")
