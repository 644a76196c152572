"""Trainer stage 7: what the run says — TensorBoard scalars, a progress bar, log lines (main process only).

Scalars (x axis: optimizer step):
    train/loss                    loss of the step under the loss contract (all ranks, all micro-batches)
    train/lr                      learning rate used by the step
    train/grad_norm               global gradient norm before clipping
    train/tokens_per_s            real (non-pad) tokens per second, all ranks
    train/supervised_tokens_per_s supervised tokens per second, all ranks
    train/step_time               seconds per optimizer step (mean over the logging window)
    eval/loss                     token-weighted loss on the eval split
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
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def step(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def line(self, msg: str) -> None:
        if self.is_main:
            log.info(msg)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
