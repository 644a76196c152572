"""Helpers the tests share that the package itself does not need: one conversation tokenized, per-token losses, the
rows of one epoch in visiting order, and the 6-step reference run the layout equivalence tests compare with."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distsft.data.packing import Rows, epoch_order
from distsft.data.tokenize import IGNORE, encode_conversations


def tokenize_messages(tokenizer, messages: list[dict], loss_on: str, template: str | None = None,
                      template_name: str = "the chat template", tools: list | None = None,
                      reasoning: bool = True) -> dict[str, Any]:
    """-> {"input_ids": [...], "labels": [...]} for one conversation (with its ``tools``)."""
    ids, sup = encode_conversations(tokenizer, [messages], loss_on, template, template_name, None,
                                    None if tools is None else [tools], reasoning)[0]
    return {"input_ids": ids.tolist(), "labels": np.where(sup, ids, IGNORE).tolist()}


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] token losses (0 where unsupervised)."""
    logits = logits[:, :-1, :].float()
    return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")


def epoch_rows(rows: Rows, seed: int, epoch: int) -> list[np.ndarray]:
    """The rows in the order epoch ``epoch`` visits them."""
    return rows[epoch_order(len(rows), seed, epoch)]


# the layout equivalence tests' run: 6 steps of the global batch of 8 (micro-batches of 2), a checkpoint at step 3
EQUIVALENCE_STEPS = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=6", "logging.log_every=1",
                     "logging.sample_every=0", "trainer.micro_batch_size=2"]


def reference_run(out) -> tuple[dict, dict]:
    """(summary, final weights) of one process running EQUIVALENCE_STEPS into ``out``."""
    from safetensors.torch import load_file

    from tests.conftest import run_tiny

    return run_tiny(out, *EQUIVALENCE_STEPS).summary, load_file(out / "final" / "model.safetensors")


def same_losses(summary: dict, ref: dict, rel: float = 1e-5) -> bool:
    """The 6 logged steps and their losses (within ``rel``) of ``ref``."""
    import pytest

    pairs = list(zip(ref["train_loss_history"], summary["train_loss_history"]))
    return len(pairs) == 6 and all(s1 == s2 and b == pytest.approx(a, rel=rel) for (s1, a), (s2, b) in pairs)
