"""Helpers the tests share that the package itself does not need: one conversation tokenized, per-token losses, and
the rows of one epoch in visiting order."""

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
