"""Trainer: what the run says — scalars to every tracker of logging.trackers (TensorBoard here, MLflow
and W&B through Accelerate: trackers.py), a progress bar, log lines (main process only).

Scalars (x axis: optimizer step):
    train/loss                    loss of the step under the loss contract (all ranks, all micro-batches)
    train/lr                      learning rate used by the step
    train/grad_norm               global gradient norm before clipping
    train/tokens_per_s            real (non-pad) tokens per second, all ranks
    train/supervised_tokens_per_s supervised tokens per second, all ranks
    train/step_time               seconds per optimizer step (mean over the logging window)
    train/supervised_tokens       supervised tokens per optimizer step (all ranks, window mean)
    train/packing_efficiency      real tokens / tokens computed (padding included), window
    train/mfu                     model FLOPs utilisation (see model_flops), when the peak is known
    train/peak_memory_gb          GPU: torch max allocated; CPU: peak resident memory of rank 0
    train/skipped_steps           steps skipped so far for a non-finite loss or gradient norm
    train/aux_loss                MoE: the router load-balancing term of the loss (coef x mean row term), window mean
    train/expert_load_max         MoE: top-k assignments of the busiest expert / the mean per expert (1 = balanced)
    train/expert_load_min         MoE: the same for the idlest expert (0: an expert that got no token)
    eval/loss                     token-weighted loss on the eval split
    eval/gap                      eval loss minus the train loss of the last window (overfitting grows it)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .samples import as_markdown
from .step import RouterStats, StepCounts, StepResult
from .trackers import Trackers, hyper_parameters, tensorboard_hparams

log = logging.getLogger("distsft")


class Reporter:
    """Where the run's numbers go (main process only): TensorBoard event files, the Accelerate trackers, the
    progress bar and the log lines."""

    def __init__(self, accelerator, output_dir: Path, total_steps: int, start_step: int, logging_cfg, config: dict):
        self.is_main = accelerator.is_main_process
        self.writer = self.trackers = self.bar = None
        if not self.is_main:
            return
        params = hyper_parameters(config)
        if "tensorboard" in logging_cfg.trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
            tensorboard_hparams(self.writer, params)
        if accelerator.log_with:
            self.trackers = Trackers(accelerator, output_dir, config["run_name"], params, start_step)
        if logging_cfg.progress_bar:
            # disable=None: no bar when stderr is not a terminal (a log file, a SLURM .out), where its
            # redraws would run into the log lines
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.trackers is not None:
            self.trackers.scalars(step, values)

    def samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """(prompt, reply) pairs: TensorBoard text ``samples``, and the other trackers' own forms (trackers.py)."""
        if self.writer is not None:
            self.writer.add_text("samples", as_markdown(samples), step)
        if self.trackers is not None:
            self.trackers.samples(step, samples)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def line(self, msg: str) -> None:
        if self.is_main:
            log.info(msg)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        if self.trackers is not None:
            self.trackers.close()


class Window:
    """The step results of one logging window, accumulated on the device; read back (one collective and one
    host read) only at a log step, so the steps in between never wait for the device."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []  # per step: this rank's share of the step loss (on the device)
        self.steps_seen: list[tuple[int, list]] = []  # per step: (step, example ids)
        self.counts = StepCounts.zeros(self.device)
        self.router: RouterStats | None = None
        self.grad_norm = None
        self.data_time = 0.0  # seconds the host waited for the DataLoader
        self.t0 = time.perf_counter()

    def add(self, step: int, res: StepResult, example_ids: list) -> None:
        self.losses.append(res.loss_sum)
        self.steps_seen.append((step, example_ids))
        self.counts = self.counts + res.counts
        if res.router is not None:
            self.router = res.router if self.router is None else self.router + res.router
        self.grad_norm = res.grad_norm

    def pause(self, seconds: float) -> None:
        """Eval and checkpoints do not count as training time."""
        self.t0 += seconds

    def read(self, accelerator) -> "WindowStats":
        """Every step's loss summed over ranks (one all-reduce) and the window's counts, on the host."""
        n = len(self.losses)
        values = torch.stack(self.losses).float()
        if self.router is not None:  # the router term and expert load ride the same collective
            values = torch.cat([values, self.router.aux_share.reshape(1).float(), self.router.load.float()])
        values = accelerator.reduce(values, reduction="sum").tolist()
        load = values[n + 1:] if self.router is not None else None
        return WindowStats(step_losses=values[:n], counts=self.counts.read(), seconds=time.perf_counter() - self.t0,
                           data_time=self.data_time, grad_norm=float(self.grad_norm), steps_seen=self.steps_seen,
                           aux_loss=values[n] / n if self.router is not None else None, expert_load=load)


@dataclass
class WindowStats:
    step_losses: list[float]  # the step loss of every step of the window (all ranks)
    counts: dict[str, float]  # StepCounts.FIELDS summed over the window's steps
    seconds: float  # training time of the window (eval and checkpoints excluded)
    data_time: float
    grad_norm: float  # of the window's last step
    steps_seen: list[tuple[int, list]]
    aux_loss: float | None = None  # MoE: mean router term per step
    expert_load: list[float] | None = None  # MoE: top-k assignments per expert, all ranks and layers

    @property
    def loss(self) -> float:
        return sum(self.step_losses) / len(self.step_losses)

    def scalars(self, lr: float, skipped: int, flops: tuple[float, float], peak: float | None,
                world: int) -> dict[str, float]:
        """The train/ scalars of the window (see the module docstring)."""
        c, dt, steps = self.counts, self.seconds, len(self.step_losses)
        out = {"train/loss": self.loss, "train/lr": lr, "train/grad_norm": self.grad_norm,
               "train/tokens_per_s": c["tokens"] / dt, "train/supervised_tokens_per_s": c["supervised"] / dt,
               "train/step_time": dt / steps, "train/data_time": self.data_time / steps,
               "train/supervised_tokens": c["supervised"] / steps,
               "train/packing_efficiency": c["tokens"] / max(c["cells"], 1), "train/peak_memory_gb": peak_memory_gb(),
               "train/skipped_steps": skipped}
        if peak:
            out["train/mfu"] = (flops[0] * c["tokens"] + flops[1] * c["attn_sq"]) / (dt * peak * world)
        if self.aux_loss is not None:
            mean = max(sum(self.expert_load) / len(self.expert_load), 1e-12)
            out.update({"train/aux_loss": self.aux_loss, "train/expert_load_max": max(self.expert_load) / mean,
                        "train/expert_load_min": min(self.expert_load) / mean})
        return out

    def line(self, step: int, total: int, scalars: dict[str, float]) -> str:
        s = scalars
        text = (f"step {step}/{total} loss {s['train/loss']:.4f} lr {s['train/lr']:.3e} grad_norm "
                f"{s['train/grad_norm']:.3f} tok/s {s['train/tokens_per_s']:,.0f} sup_tok/s "
                f"{s['train/supervised_tokens_per_s']:,.0f}")
        if "train/mfu" in s:
            text += f" mfu {s['train/mfu']:.1%}"
        if "train/aux_loss" in s:
            text += (f" aux {s['train/aux_loss']:.4f} expert load {s['train/expert_load_min']:.2f}-"
                     f"{s['train/expert_load_max']:.2f}x")
        return text


# Dense bf16 peak FLOP/s per GPU (vendor datasheets); MFU is reported against bf16 whatever the precision.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "A10": 125e12,
              "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(configured: float | None) -> float | None:
    if configured:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def model_flops(model, trainable: int, total: int) -> tuple[float, float]:
    """(FLOPs per token of the weights, FLOPs per (document length)^2 of attention) for one training step.

    Weights: 6N for full fine-tuning (forward 2N, backward 4N), 4N when the base is frozen (PEFT: no
    weight gradients), N excluding the input embedding (a lookup, not a matmul) unless it is tied to the
    output head (then it is the head's matmul too). Attention, causal,
    per layer: forward 2*d*T^2 (QK^T and AV over half the square), x3 with backward -> 6*L*d*T^2.
    """
    cfg = getattr(model, "config", None)
    from ..model.load import base_model
    from ..model.moe import active_parameters
    from ..model.params import true_numel

    inner = base_model(model)
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    # the input embedding is a lookup; but a tied one is also the output head, a full matmul
    tied = emb is not None and head is not None and head.weight is emb.weight
    n = active_parameters(model) - (true_numel(emb.weight) if emb is not None and not tied else 0)  # MoE: active
    per_token = (6 if trainable == total else 4) * n
    layers = getattr(cfg, "num_hidden_layers", 0)
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    return float(per_token), float(6 * layers * heads * head_dim)


def peak_memory_gb() -> float:
    """GPU: max allocated by torch; CPU: the process's peak resident memory."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
