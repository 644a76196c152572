"""Data (collate): turn rows of example ids into model-ready tensors.

Packed mode, micro-batch of 2 rows, examples A (3 tokens), B (2), C (4), P = pad::

    row 0: A0 A1 A2 B0 B1        row 1: C0 C1 C2 C3 P
    input_ids     [[a0 a1 a2 b0 b1], [c0 c1 c2 c3 pad]]
    position_ids  [[ 0  1  2  0  1], [ 0  1  2  3   0]]    restart at 0 for every document
    labels        [[-100 l1 l2 -100 l1], [-100 l1 l2 l3 -100]]  first token of each doc ignored
    cu_seqlens    [0, 3, 5, 9, 10]       document boundaries in the flattened [B*T] layout
    max_seqlen    4

The model is called with ``input_ids`` and ``position_ids`` only, no ``attention_mask`` and
``use_cache=False``: transformers then builds a block-diagonal causal mask from the restarting
positions (flash varlen kernels read the same boundaries). The pad tail is its own segment,
so it attends to nothing real and carries no loss.

Padded mode (``data.mode=pad``) keeps one example per row, right-pads to the longest row and
passes ``attention_mask``; positions are plain ``arange``.
"""

from __future__ import annotations

import numpy as np
import torch

from .store import TokenStore
from .tokenize import IGNORE


def collate_packed(store: TokenStore, rows: list[list[int]], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """``multiple``: the width is rounded up to it (sequence parallelism splits rows into equal slices)."""
    width = -(-max(int(store.lengths[r].sum()) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    seqlens = []
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            x, y = store.example(i)
            n = len(x)
            ids[b, t:t + n], labels[b, t:t + n], pos[b, t:t + n] = x, y, np.arange(n)
            seqlens.append(n)
            t += n
        if t < width:  # pad tail: a segment of its own, positions restart
            pos[b, t:] = np.arange(width - t)
            seqlens.append(width - t)
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos), "cu_seqlens": torch.from_numpy(cu),
            "max_seqlen": torch.tensor(max(seqlens))}


def collate_padded(store: TokenStore, rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    examples = [store.example(i) for row in rows for i in row]
    width = max(len(x) for x, _ in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for b, (x, y) in enumerate(examples):
        ids[b, :len(x)], labels[b, :len(x)], mask[b, :len(x)] = x, y, 1
    pos = np.broadcast_to(np.arange(width), (len(examples), width)).copy()
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos), "attention_mask": torch.from_numpy(mask)}


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions b*T + t whose next token is supervised, those tokens) of labels [B, T]."""
    b, t = labels.shape
    nxt = labels[:, 1:]  # [B, T-1]
    rows, cols = (nxt != IGNORE).nonzero(as_tuple=True)
    return rows * t + cols, nxt[rows, cols]



def sequence_shard(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """Sequence parallelism: rank ``rank`` of a group of ``size`` keeps the contiguous slice
    ``[rank*T/size, (rank+1)*T/size)`` of every row of a packed micro-batch. A row of T=8, size 2,
    document A (5 tokens) straddling the split, B (3)::

        full row      A0 A1 A2 A3 | A4 B0 B1 B2        position_ids 0 1 2 3 | 4 0 1 2
        targets       a1 a2 a3 a4 | -- b1 b2 --        position t predicts token t+1, shifted over the WHOLE row
        rank 0        input_ids A0..A3, position_ids 0 1 2 3, targets a1 a2 a3 a4   (a4 is rank 1's first token)
        rank 1        input_ids A4 B0 B1 B2, position_ids 4 0 1 2, targets -- b1 b2 --

    The slice's ``targets`` replace ``labels`` (no shift is left to do); ``sup_index`` / ``sup_targets`` are
    the slice's. Attention sees whole rows again after DeepSpeed's all-to-all (which gathers position_ids;
    ``cu_seqlens`` stays the whole rows'). The counts become the slice's share, so that summing over every rank
    counts each token once: supervised, real tokens and cells by slice; rows and attention FLOPs on rank 0.
    """
    ids = batch["input_ids"]
    b, t = ids.shape
    if t % size:
        raise ValueError(f"a row of {t} tokens does not split into {size} equal slices")
    n = t // size
    lo, hi = rank * n, (rank + 1) * n
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)[:, lo:hi]  # [B, n]
    out = {k: v for k, v in batch.items() if k != "labels"}
    out.update(input_ids=ids[:, lo:hi].contiguous(), position_ids=batch["position_ids"][:, lo:hi].contiguous(),
               targets=targets.contiguous())
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    out["sup_index"], out["sup_targets"] = rows * n + cols, targets[rows, cols]
    if "row_tokens" in batch:  # real tokens come first in a row
        out["row_tokens"] = (batch["row_tokens"] - lo).clamp(0, n)
    if "n_supervised" in batch:
        out["n_supervised"] = torch.tensor(int(rows.numel()))
        out["n_tokens"] = out["row_tokens"].sum() if "row_tokens" in out else torch.tensor(b * n)
        out["n_cells"] = torch.tensor(b * n)
        if rank:  # whole-row counts: once per group
            out["n_rows"], out["attn_sq"] = torch.zeros_like(batch["n_rows"]), torch.zeros_like(batch["attn_sq"])
    return out


def supervised_count(batch: dict[str, torch.Tensor]) -> int | torch.Tensor:
    """Supervised positions of a batch (of its slice under sequence parallelism)."""
    if "sup_targets" in batch:
        return batch["sup_targets"].numel()
    return (batch["labels"][:, 1:] != IGNORE).sum()


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] bool: the positions that hold a real token, not padding (real tokens come first in a row)."""
    ids = batch["input_ids"]
    if "row_tokens" in batch:
        return torch.arange(ids.size(1), device=ids.device)[None, :] < batch["row_tokens"][:, None]
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return torch.ones_like(ids, dtype=torch.bool)


MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")
# the rest (counts, ids, max_seqlen) stays on the host
ON_DEVICE = MODEL_INPUTS + ("labels", "targets", "cu_seqlens", "sup_index", "sup_targets", "row_tokens")


def to_device(batch: dict[str, torch.Tensor], device, non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """The batch with what the forward and the loss read moved to ``device``."""
    return {k: v.to(device, non_blocking=non_blocking) if k in ON_DEVICE else v for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor], varlen: bool = False) -> dict:
    """The keys the model's forward receives (never labels). ``varlen``: also the document boundaries,
    under the names transformers passes through to the attention function."""
    out = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if varlen and "cu_seqlens" in batch:
        n = int(batch["max_seqlen"])  # a CPU tensor until here: no device sync
        out.update(cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"], max_length_q=n,
                   max_length_k=n)
    return out
