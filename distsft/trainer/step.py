"""Trainer stage 5a: one optimizer step under the loss contract (the step's math; the loop around it is
``loop.py``).

    count supervised tokens (and rows) of all the step's micro-batches, all-reduce    -> N (R)
    for each micro-batch (no gradient sync but on the last):
        loss share = sum token CE / N  (+ MoE router term: coef x sum of row terms / R)
        backward(share x world_size x accumulation)   (undoes DDP's and Accelerate's averaging)
    clip, optimizer step (a non-finite one skipped, on the device with fused AdamW), scheduler step
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.collate import model_inputs, real_tokens, supervised_positions, to_device
from ..model import head, moe
from ..model.attention import VARLEN
from ..model.kernels import fused_loss
from .loss import token_ce_sum
from .optim import skip_flag

COUNTED = ("n_supervised", "n_tokens", "attn_sq", "n_cells", "n_rows")  # summed over micro-batches and ranks
SUP, REAL, ATTN, CELLS, ROWS, STOP = range(6)


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's share of the step loss (sum over ranks = step loss)
    grad_norm: torch.Tensor
    counts: torch.Tensor  # [supervised, real, sum doc_len^2, computed tokens, stop requests], all ranks
    finite: torch.Tensor  # loss and gradient norm finite (the update was applied); on the device
    lag: int = 0  # 1: the update was decided on the device, the host may read the flags a step late
    applied_anyway: bool = False  # not finite, yet DeepSpeed's engine (which steps inside backward) applied it

    @property
    def flags(self) -> torch.Tensor:
        return torch.stack([self.finite.double(), self.counts[STOP].double()])


def forward_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of the token cross-entropies of the supervised positions, and for an MoE model router_aux_loss_coef
    x the sum over the rows of their router load-balancing terms (model.moe), else None)."""
    # use_cache=False and no attention_mask on packed rows: that is what keeps documents apart
    varlen = getattr(model, "module", model).config._attn_implementation == VARLEN
    inputs = model_inputs(batch, varlen)
    spec = moe.router(model)
    if spec is not None:
        inputs["output_router_logits"] = True
    if fused_loss(model):  # Liger: the loss straight from the hidden states, no logits (sum: 1 item)
        out = model(**inputs, labels=batch["labels"], num_items_in_batch=1, use_cache=False)
        ce = out.loss.float() - (spec.coef * out.aux_loss.float() if spec is not None else 0)  # ours is per row
    elif head.installed(model):  # the head returns the CE sum of the supervised positions (model.head)
        if "sup_index" not in batch:
            batch = {**batch, **dict(zip(("sup_index", "sup_targets"), supervised_positions(batch["labels"])))}
        with head.supervised(model, batch["sup_index"], batch["sup_targets"]):
            out = model(**inputs, use_cache=False)
        ce = out.logits
    else:
        out = model(**inputs, use_cache=False)
        ce = token_ce_sum(out.logits, batch["labels"])
    if spec is None:
        return ce, None
    return ce, spec.coef * moe.row_balance_sum(out.router_logits, real_tokens(batch), spec)


def forward_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the token cross-entropies of the supervised positions."""
    return forward_losses(model, batch)[0]


def accumulate_gradients(model, micro_batches: list[dict], accelerator,
                         stop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward every micro-batch of one optimizer step under the loss contract.

    Returns (this rank's share of the step loss, the COUNTED sums and stop requests of all ranks).
    """
    device = accelerator.device
    counts = torch.tensor([float(sum(int(mb[k]) for mb in micro_batches)) for k in COUNTED] + [stop],
                          dtype=torch.float64)
    if device.type == "cuda":  # a copy from pageable memory would wait for the queued GPU work
        counts = counts.pin_memory()
    # one all-reduce per step: N over all micro-batches and ranks, and whether any rank must stop
    counts = accelerator.reduce(counts.to(device, non_blocking=True), reduction="sum")
    n_sup = counts[SUP].clamp(min=1).float()
    n_rows = counts[ROWS].clamp(min=1).float()
    # DDP/ZeRO average gradients over W ranks and Accelerate/DeepSpeed divide the loss by the
    # accumulation steps A: undo both, then divide by N (the router term: by the step's rows)
    undo = accelerator.num_processes * accelerator.gradient_accumulation_steps
    total = torch.zeros((), device=device)
    for mb in micro_batches:
        # accumulate(): no gradient sync (DDP no_sync / DeepSpeed boundary) but on the last micro-batch
        with accelerator.accumulate(model):
            mb = to_device(mb, device, non_blocking=True)
            ce_sum, router_sum = forward_losses(model, mb)
            share = ce_sum / n_sup
            if router_sum is not None:  # once per step: coef x the mean over the step's rows
                share = share + router_sum / n_rows
            accelerator.backward(share * undo)
            total += share.detach()
    assert accelerator.sync_gradients, "micro-batches per step must equal the accumulation steps"
    return total, counts


def train_step(model, micro_batches: list[dict], accelerator, optimizer, scheduler,
               max_grad_norm: float, stop: float = 0.0) -> StepResult:
    loss_share, counts = accumulate_gradients(model, micro_batches, accelerator, stop)
    # under DeepSpeed the engine has already clipped and stepped; this returns its global norm
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    grad_norm = torch.as_tensor(grad_norm if grad_norm is not None else math.nan, device=accelerator.device)
    # the norm comes from gradients reduced over ranks: the same verdict everywhere
    finite = torch.isfinite(grad_norm) & torch.isfinite(loss_share)
    skip, applied = skip_flag(optimizer), False
    if skip is not None:  # fused AdamW skips a non-finite update itself: no host sync in the step
        skip.copy_(~finite)
        optimizer.step()
    elif bool(finite):  # other optimizers: decided on the host (one sync)
        optimizer.step()
    elif hasattr(model, "was_step_applied"):  # DeepSpeed stepped inside backward; its overflow check skips
        applied = model.was_step_applied()
    scheduler.step()  # the schedule follows the step count, skipped steps included
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_share, grad_norm, counts, finite, lag=int(skip is not None), applied_anyway=applied)


@torch.no_grad()
def evaluate(model, batches: list[dict], accelerator) -> float:
    """Token-weighted eval loss over all ranks' shares (sum CE / supervised tokens)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    # every rank runs the same number of batches (ZeRO-3 gathers parameters collectively)
    with accelerator.autocast():
        for mb in batches:
            mb = to_device(mb, accelerator.device)
            sums[0] += forward_loss_sum(model, mb).double()
            sums[1] += (mb["labels"][:, 1:] != -100).sum()
    sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    return (sums[0] / sums[1].clamp(min=1)).item()
