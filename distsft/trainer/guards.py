"""Trainer: guards — non-finite steps, loss spikes, early stopping.

Non-finite loss or gradient norm: the verdict is the gradient norm's, computed from gradients already
reduced over ranks, so every rank sees the same verdict without another collective (a rank whose own loss
is not finite turns its gradients NaN before the reduction: step._poison); the update is
skipped everywhere (the data moves on, the LR schedule follows the step count), the samples of
the step are named (file and row, from every rank), and after ``trainer.max_bad_steps``
consecutive bad steps the run stops with a clear message. Under DeepSpeed the engine steps inside
backward and skips a non-finite step itself (its overflow check): ``was_step_applied()`` tells, and
the step counts as skipped; if the engine applied it anyway, the run stops at once.

With fused AdamW the skip happens on the device, and the host learns of it (and of a stop request)
one step late, through ``StepVerdicts``: the training step itself never waits for the GPU.

Loss spikes: a step loss above ``trainer.spike_factor`` x the running median of recent steps is
logged with the step's samples (it is trained on; a spike is a lead to a bad row, not a failure).

Early stopping: eval losses are all-reduced (identical on every rank); rank 0 decides and the
decision is broadcast, so all ranks stop together.

Their state (skipped steps, the spike median and spikes, the best eval and the patience count) is
saved in every checkpoint (``TrainState.guards``): a resumed run judges like an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

import torch
from accelerate.utils import broadcast

log = logging.getLogger("distsft")


class Stateful:
    """state_dict/load_state_dict over the attributes in FIELDS: the guards' state travels in every
    checkpoint (TrainState.guards), so a resumed run judges exactly like an uninterrupted one."""

    FIELDS: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    def load_state_dict(self, state: dict) -> None:
        for f in self.FIELDS:
            if f in state:
                setattr(self, f, state[f])


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite steps); the message says why and what to try."""


class BadStepGuard(Stateful):
    FIELDS = ("consecutive", "skipped")

    def __init__(self, max_bad: int):
        self.max_bad = max_bad
        self.consecutive = 0
        self.skipped: list[int] = []

    def check(self, step: int, finite: bool, origins, rank: int, applied: bool = False) -> None:
        """``origins()`` names the step's samples; only called for a bad step. ``applied``: the update of a
        non-finite step was applied anyway (a DeepSpeed engine that did not skip it)."""
        if finite:
            self.consecutive = 0
            return
        origins = origins()
        self.consecutive += 1
        self.skipped.append(step)
        log.warning("rank %d: step %d has a non-finite loss or gradient norm; %s; samples: %s", rank, step,
                    "DeepSpeed applied the update anyway" if applied else "update skipped",
                    "; ".join(origins[:20]) + (" ..." if len(origins) > 20 else ""))
        if applied:
            raise TrainingError(f"non-finite gradient at step {step}, and DeepSpeed applied the update (its engine "
                                "steps inside backward and its overflow check did not skip it): resume from the last "
                                "checkpoint with a lower optim.lr, or check the samples named above")
        if self.consecutive >= self.max_bad:
            raise TrainingError(f"{self.consecutive} consecutive steps with a non-finite loss or gradient norm (up to "
                                f"step {step}; trainer.max_bad_steps={self.max_bad}): lower optim.lr, keep "
                                "trainer.max_grad_norm > 0, or check the samples named above")


class StepVerdicts:
    """Each step's flags (finite, stop requested), read on the host ``lag`` steps late.

    Reading a device value waits for all the work queued before it. Read right after its own step,
    it would leave the GPU idle while the host loads and launches the next step; read once the next
    step is queued, the GPU has work meanwhile. The copy goes to pinned memory behind an event.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: deque = deque()
        self.ring = [torch.zeros(2, dtype=torch.float64, pin_memory=self.cuda) for _ in range(4)]
        self.pushed = 0

    def push(self, step: int, flags: torch.Tensor, payload) -> None:
        buf = self.ring[self.pushed % len(self.ring)]  # at most lag + 1 <= 2 are pending at once
        self.pushed += 1
        buf.copy_(flags, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((step, buf, event, payload))

    def ready(self, lag: int):
        """(step, finite, stop requested, payload) of every pending step but the last ``lag``, in order."""
        while len(self.pending) > lag:
            step, buf, event, payload = self.pending.popleft()
            if event is not None:
                event.synchronize()
            yield step, bool(buf[0]), bool(buf[1]), payload


class SpikeDetector(Stateful):
    """A step loss above ``factor`` x the running median of the last ``window`` steps is a spike: logged
    with the step's samples (every rank names its own), counted, and training goes on. The step loss is
    the all-reduced one, so every rank agrees on what is a spike."""

    FIELDS = ("recent", "spikes")

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, max(1, window)
        self.recent: list[float] = []
        self.spikes: list[int] = []

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def check(self, step: int, loss: float, origins, rank: int) -> bool:
        spike = len(self.recent) >= self.window and loss > self.factor * statistics.median(self.recent)
        if spike:
            self.spikes.append(step)
            names = origins()
            log.warning("rank %d: loss spike at step %d: %.4f > %g x running median %.4f of the last %d steps; "
                        "samples: %s", rank, step, loss, self.factor, statistics.median(self.recent), self.window,
                        "; ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
        if math.isfinite(loss) and not spike:  # a spike or a NaN does not move the median
            self.recent = (self.recent + [loss])[-self.window:]
        return spike


class EarlyStopping(Stateful):
    FIELDS = ("best", "best_step", "bad_evals")

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_step = 0
        self.bad_evals = 0

    def update(self, step: int, loss: float) -> bool:
        """Record an eval; True when it is a new best."""
        if self.best is None or loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = loss, step, 0
            return True
        self.bad_evals += 1
        return False

    def should_stop(self, accelerator) -> bool:
        decide = torch.tensor([float(self.patience > 0 and self.bad_evals >= self.patience)], device=accelerator.device)
        return bool(broadcast(decide, from_process=0).item())  # rank 0 decides for everyone


class Guards:
    """Every guard of a run as one object: bad steps (judged from the late-read verdicts), loss spikes and
    early stopping, with one state_dict for the checkpoint and one summary of what they saw."""

    def __init__(self, trainer_cfg, device: torch.device):
        self.bad_steps = BadStepGuard(trainer_cfg.max_bad_steps)
        self.verdicts = StepVerdicts(device)
        self.spikes = SpikeDetector(trainer_cfg.spike_factor, trainer_cfg.spike_window)
        self.early = EarlyStopping(trainer_cfg.early_stop_patience, trainer_cfg.early_stop_min_delta)

    def record(self, step: int, result, example_ids: list) -> None:
        """A step's flags (finite? stop requested?), to be read on the host ``result.lag`` steps late."""
        self.verdicts.push(step, result.flags, (example_ids, result.applied_anyway))

    def judge(self, lag: int, origins, rank: int) -> bool:
        """Judge every recorded step but the last ``lag`` (``origins(example_ids)`` names a bad step's samples);
        True if a stop was requested (the same on every rank: it came through the step's all-reduce)."""
        stop = False
        for step, finite, stop_requested, (ids, applied) in self.verdicts.ready(lag):
            self.bad_steps.check(step, finite, lambda ids=ids: origins(ids), rank, applied)
            stop |= stop_requested
        return stop

    def _stateful(self) -> dict[str, Stateful]:
        return {"bad_steps": self.bad_steps, "spikes": self.spikes, "early_stopping": self.early}

    def state_dict(self) -> dict:
        return {name: g.state_dict() for name, g in self._stateful().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, g in self._stateful().items():
            g.load_state_dict(state.get(name, {}))

    def outcome(self) -> dict:
        """What summary.json reports of them."""
        best = {"step": self.early.best_step, "loss": self.early.best} if self.early.best is not None else None
        return {"skipped_steps": self.bad_steps.skipped, "loss_spikes": self.spikes.spikes, "best_eval": best}
