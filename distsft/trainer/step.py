"""Trainer: one optimizer step under the loss contract (the step's math; the loop around it is
``loop.py``).

    count supervised tokens (and rows) of all the step's micro-batches, all-reduce    -> N (R)
    for each micro-batch (no gradient sync but on the last):
        loss share = sum token CE / N  (+ MoE router term: coef x sum of row terms / R)
        backward(share x data-parallel size x accumulation)   (undoes DDP's/ZeRO's averaging and Accelerate's;
                                                              a non-finite share makes this rank's gradients NaN)
    clip, optimizer step (skipped when the reduced gradient norm is not finite: the same verdict on every rank;
                          on the device with fused AdamW), scheduler step
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.collate import model_inputs, real_tokens, supervised_count, supervised_positions, to_device
from ..model import head, moe
from ..model.attention import VARLEN
from ..model.kernels import fused_loss
from .loss import target_ce_sum, token_ce_sum
from .optim import skip_flag
from .watchdog import progress


class StepCounts:
    """What one optimizer step counted, summed over its micro-batches and every rank: one float64 tensor on the
    device (one all-reduce per step, no host read), its fields read by name::

        supervised  tokens with a label (N of the loss contract)     tokens  real (non-pad) tokens
        attn_sq     sum of (document length)^2 (attention FLOPs)     cells   tokens computed, padding included
        rows        rows (the MoE router term is a mean over them)   stop    ranks that were asked to stop
    """

    FIELDS = ("supervised", "tokens", "attn_sq", "cells", "rows", "stop")
    BATCH_KEYS = ("n_supervised", "n_tokens", "attn_sq", "n_cells", "n_rows")  # the micro-batches' keys, in order

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor  # [len(FIELDS)] float64

    @classmethod
    def zeros(cls, device) -> "StepCounts":
        return cls(torch.zeros(len(cls.FIELDS), dtype=torch.float64, device=device))

    @classmethod
    def of_step(cls, micro_batches: list[dict], stop: float, accelerator) -> "StepCounts":
        """Counted on the host, summed over ranks on the device."""
        host = torch.tensor([float(sum(int(mb[k]) for mb in micro_batches)) for k in cls.BATCH_KEYS] + [stop],
                            dtype=torch.float64)
        host[:-1] /= tensor_replicas(accelerator)  # a tp group's ranks hold the same rows: counted once (exact)
        if accelerator.device.type == "cuda":  # a copy from pageable memory would wait for the queued GPU work
            host = host.pin_memory()
        return cls(accelerator.reduce(host.to(accelerator.device, non_blocking=True), reduction="sum"))

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in StepCounts.FIELDS:
            return self.tensor[StepCounts.FIELDS.index(name)]
        raise AttributeError(name)

    def __add__(self, other: "StepCounts") -> "StepCounts":
        return StepCounts(self.tensor + other.tensor)

    def read(self) -> dict[str, float]:
        """Every field on the host (one device read)."""
        return dict(zip(self.FIELDS, self.tensor.tolist()))


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's share of the step loss (sum over ranks = step loss)
    grad_norm: torch.Tensor
    counts: StepCounts  # of all ranks
    finite: torch.Tensor  # loss and gradient norm finite (the update was applied); on the device
    lag: int = 0  # 1: the update was decided on the device, the host may read the flags a step late
    applied_anyway: bool = False  # not finite, yet DeepSpeed's engine (which steps inside backward) applied it
    router: "RouterStats | None" = None  # MoE: this rank's share of the router term, and its expert load

    @property
    def flags(self) -> torch.Tensor:
        return torch.stack([self.finite.double(), self.counts.stop.double()])


@dataclass
class RouterStats:
    """An MoE step's router term (this rank's share of coef x the mean row term; the sum over ranks is the
    step's) and expert load ([E] top-k assignments of this rank's real tokens, every layer), on the device."""

    aux_share: torch.Tensor
    load: torch.Tensor

    def __add__(self, other: "RouterStats") -> "RouterStats":
        return RouterStats(self.aux_share + other.aux_share, self.load + other.load)


def forward_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple | None]:
    """(sum of the token cross-entropies of the supervised positions, and for an MoE model (router_aux_loss_coef
    x the sum over the rows of their router load-balancing terms, the expert load) (model.moe), else None)."""
    # use_cache=False and no attention_mask on packed rows: that is what keeps documents apart
    varlen = getattr(model, "module", model).config._attn_implementation == VARLEN
    inputs = model_inputs(batch, varlen)
    spec = moe.router(model)
    if spec is not None:
        inputs["output_router_logits"] = True
    out = ce = None
    if fused_loss(model):  # Liger: the loss straight from the hidden states, no logits (sum: 1 item)
        out = model(**inputs, labels=batch["labels"], num_items_in_batch=1, use_cache=False)
        ce = out.loss.float() - (spec.coef * out.aux_loss.float() if spec is not None else 0)  # ours is per row
    elif head.installed(model):  # the head returns the CE sum of the supervised positions (model.head)
        if "sup_index" not in batch:
            batch = {**batch, **dict(zip(("sup_index", "sup_targets"), supervised_positions(batch["labels"])))}
        with head.supervised(model, batch["sup_index"], batch["sup_targets"]) as returned:
            out = model(**inputs, use_cache=False)
        # the loss only if the model returned its head's sum unchanged (checked on the host, no sync); if it
        # changed it after the head (a logit multiplier, soft-capping), the head is now uninstalled and this
        # micro-batch reruns below on the plain path, the first forward's graph dropped unused (eval alike).
        # The check reads the model's code, not the data: every rank fails it on the same first micro-batch,
        # so under ZeRO-3 all take the same extra forward and their parameter gathers still match
        ce = out.logits if head.confirm(model, returned, out.logits) else None
    if ce is None:  # the plain path: full logits, cross-entropy here
        out = None  # a rerun: the first forward's activations go before the second's are made
        out = model(**inputs, use_cache=False)
        ce = target_ce_sum(out.logits, batch["targets"]) if "targets" in batch else token_ce_sum(out.logits,
                                                                                                   batch["labels"])
    if spec is None:
        return ce, None
    balance, load = moe.row_balance_sum(out.router_logits, real_tokens(batch), spec)
    return ce, (spec.coef * balance, load)


def tensor_replicas(accelerator) -> int:
    """Ranks that hold the same rows and compute the same loss: the tensor-parallel group (1 without TP)."""
    pc = accelerator.parallelism_config
    return pc.tp_size if pc is not None and pc.tp_enabled else 1


def gradient_divisor(accelerator, model) -> int:
    """What the strategy divides the gradients summed over all ranks by: the world size, but under sequence
    parallelism ZeRO-1/2 (and ZeRO-3 without reduce-scatter) divide by the data-parallel size (world / sp)
    while ZeRO-3's reduce-scatter divides by the world (DeepSpeed 0.19); FSDP2 averages over the ranks it shards
    over (data- and sequence-parallel: world / tp), a tensor-parallel rank's gradient being its slice's whole. The
    sp=1 and tp=1 equivalence tests hold either way only if this is right."""
    pc, world = accelerator.parallelism_config, accelerator.num_processes
    if getattr(accelerator, "is_fsdp2", False):  # FSDP2 (tensor parallelism runs only under it): its dp x sp ranks
        return world // tensor_replicas(accelerator)
    sp = pc.sp_size if pc is not None and pc.sp_enabled else 1
    if sp == 1:
        return world
    zero3 = getattr(model, "zero_optimization_stage", lambda: 0)() == 3
    if zero3 and getattr(getattr(model, "optimizer", None), "reduce_scatter", True):
        return world
    return world // sp


def forward_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the token cross-entropies of the supervised positions."""
    return forward_losses(model, batch)[0]


def accumulate_gradients(model, micro_batches: list[dict], accelerator,
                         stop: float = 0.0) -> tuple[torch.Tensor, StepCounts, RouterStats | None]:
    """Forward/backward every micro-batch of one optimizer step under the loss contract.

    Returns (this rank's share of the step loss, the counts of all ranks, the MoE router statistics or None).
    """
    # one all-reduce per step: N over all micro-batches and ranks, and whether any rank must stop
    counts = StepCounts.of_step(micro_batches, stop, accelerator)
    n_sup, n_rows = counts.supervised.clamp(min=1).float(), counts.rows.clamp(min=1).float()
    # DDP/ZeRO average gradients over the ranks (see gradient_divisor) and Accelerate/DeepSpeed divide the loss
    # by the accumulation steps A: undo both, then divide by N (the router term: by the step's rows)
    undo = gradient_divisor(accelerator, model) * accelerator.gradient_accumulation_steps
    replicas = tensor_replicas(accelerator)
    total, router = torch.zeros((), device=accelerator.device), None
    for mb in micro_batches:
        # accumulate(): no gradient sync (DDP no_sync / DeepSpeed boundary) but on the last micro-batch
        with accelerator.accumulate(model):
            mb = to_device(mb, accelerator.device, non_blocking=True)
            ce_sum, balance = forward_losses(model, mb)
            share = ce_sum / n_sup
            if balance is not None:  # once per step: coef x the mean over the step's rows
                aux = balance[0] / n_rows
                share = share + aux
                stats = RouterStats(aux.detach(), balance[1])
                router = stats if router is None else router + stats
            accelerator.backward(share * undo * _poison(share))
            total += share.detach() / replicas  # this rank's share of the step loss: a tp group's ranks split it
    assert accelerator.sync_gradients, "micro-batches per step must equal the accumulation steps"
    return total, counts, router


def _poison(share: torch.Tensor) -> torch.Tensor:
    """1, or NaN when this rank's loss share is not finite: its gradients then turn NaN, and the gradient reduction
    carries the verdict to every rank (an infinite loss can have finite gradients: a -inf logit on a target gives
    softmax's finite p - 1). On the device: no sync, no extra collective."""
    return torch.where(torch.isfinite(share.detach()), 1.0, math.nan)


def train_step(model, micro_batches: list[dict], accelerator, optimizer, scheduler,
               max_grad_norm: float, stop: float = 0.0) -> StepResult:
    loss_share, counts, router = accumulate_gradients(model, micro_batches, accelerator, stop)
    progress("optimizer")
    # under DeepSpeed the engine has already clipped and stepped; this returns its global norm
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    grad_norm = torch.as_tensor(grad_norm if grad_norm is not None else math.nan, device=accelerator.device)
    # the verdict comes from reduced quantities only, so every rank takes it: the norm of gradients reduced over
    # ranks, which a rank's non-finite loss has made NaN (_poison); this rank's own loss share is not asked
    finite = torch.isfinite(grad_norm)
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
    return StepResult(loss_share, grad_norm, counts, finite, lag=int(skip is not None), applied_anyway=applied,
                      router=router)


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
            sums[1] += supervised_count(mb)
    sums = accelerator.reduce(sums / tensor_replicas(accelerator), reduction="sum")
    model.train(was_training)
    return (sums[0] / sums[1].clamp(min=1)).item()
