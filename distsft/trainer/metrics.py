"""Trainer stage 7: what the run says — TensorBoard scalars, a progress bar, log lines (main process only).

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
    eval/loss                     token-weighted loss on the eval split
    eval/gap                      eval loss minus the train loss of the last window (overfitting grows it)
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("distsft")


class Reporter:
    def __init__(self, is_main: bool, output_dir: Path, total_steps: int, start_step: int,
                 tensorboard: bool, progress_bar: bool):
        self.is_main = is_main
        self.writer = None
        self.bar = None
        if not is_main:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if progress_bar:
            # disable=None: no bar when stderr is not a terminal (a log file, a SLURM .out), where its
            # redraws would run into the log lines
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

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
    from ..model.params import true_numel

    inner = base_model(model)
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    # the input embedding is a lookup; but a tied one is also the output head, a full matmul
    tied = emb is not None and head is not None and head.weight is emb.weight
    n = total - (true_numel(emb.weight) if emb is not None and not tied else 0)
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
