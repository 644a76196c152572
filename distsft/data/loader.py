"""Data (load for training): tokenize splits, pack them, and serve each rank its micro-batches.

One optimizer step consumes ``global_batch_size`` rows of the epoch's row order. Inside
step *s*, micro-batch *k* of rank *r* takes rows::

    s*G + (k*W + r)*m  ...  + m          (G global batch, W world size, m micro-batch)

so the rows of a step are the same whatever the split (1x8x1, 2x4x1, 2x2x2 ...); only who
computes them changes. Under sequence parallelism W counts data-parallel replicas and r is the replica
(rank // sp: DeepSpeed's groups are consecutive ranks); the sp ranks of a replica collate the same rows,
each keeping its slice (``collate.sequence_shard``). Rows that do not fill a last whole step are left out of that epoch
(the row order is reshuffled every epoch, so different rows are left out each time).
Resuming at (epoch, step) rebuilds the same order and starts there: the data position is exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..batch import BatchPlan
from ..config import DataConfig
from .collate import TokenStore, collate_packed, collate_padded, sequence_shard, supervised_positions
from .packing import Rows, best_fit_decreasing, epoch_order
from .prepare import SplitStats
from .sources import DataError
from .tokenize import IGNORE

log = logging.getLogger(__name__)


def pack(store: TokenStore, cfg: DataConfig, stats: SplitStats) -> Rows:
    """Rows of example ids (packed by BFD, from the token cache when it holds them, or one example per
    row) and their statistics."""
    if cfg.mode == "pack":
        rows = store.packed.get((cfg.max_seq_len, cfg.seed))
        if rows is None:
            rows = best_fit_decreasing(store.lengths, cfg.max_seq_len, cfg.seed)
        stats.packing_efficiency = float(store.lengths.sum()) / (len(rows) * cfg.max_seq_len)
        stats.examples_per_sequence = len(store) / len(rows)
    else:
        rows = Rows.singletons(len(store))
        stats.examples_per_sequence = 1.0
    stats.sequences = len(rows)
    return rows


def collate_fn(mode: str):
    return collate_packed if mode == "pack" else collate_padded


class SequenceSlice:
    """This rank's place in its sequence-parallel group (size 1: no sequence parallelism)."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size

    @classmethod
    def of_process(cls, process_index: int, sp_size: int) -> "SequenceSlice":
        return cls(process_index % sp_size, sp_size)

    def collate(self, mode: str, store: TokenStore, rows, pad_id: int) -> dict[str, torch.Tensor]:
        if self.size == 1:
            return collate_fn(mode)(store, rows, pad_id)
        return collate_packed(store, rows, pad_id, multiple=self.size)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch (its supervised positions computed) as this rank holds it."""
        batch = with_positions(batch)
        return batch if self.size == 1 else sequence_shard(batch, self.rank, self.size)


class _MicroBatches(Dataset):
    """Micro-batch i of an epoch: the rows ``order[firsts[i]:firsts[i] + m]``, collated when asked for
    (nothing per micro-batch is held: the epoch is a permutation and a vector of first positions)."""

    def __init__(self, store: TokenStore, rows: Rows, order: np.ndarray, firsts: np.ndarray, m: int,
                 mode: str, pad_id: int, sp: SequenceSlice):
        self.store, self.rows, self.order, self.firsts, self.m, self.pad_id = store, rows, order, firsts, m, pad_id
        self.mode, self.packed, self.sp = mode, mode == "pack", sp

    def __len__(self) -> int:
        return len(self.firsts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        first = int(self.firsts[i])
        rows = self.rows[self.order[first:first + self.m]]
        batch = self.sp.collate(self.mode, self.store, rows, self.pad_id)
        ids = np.concatenate(rows)
        lengths = self.store.lengths[ids]
        batch["n_supervised"] = (batch["labels"] != IGNORE).sum()
        batch["n_tokens"] = torch.tensor(int(lengths.sum()))  # real tokens (no padding)
        batch["attn_sq"] = torch.tensor(float((lengths.astype(np.float64) ** 2).sum()))  # sum of doc length^2
        batch["n_cells"] = torch.tensor(batch["input_ids"].numel())  # tokens computed, padding included
        batch["n_rows"] = torch.tensor(batch["input_ids"].size(0))  # the MoE router term is a mean over rows
        # real tokens per row (packed: its documents; padded: its one example), the rest is padding
        batch["row_tokens"] = torch.tensor([int(self.store.lengths[r].sum()) for r in rows]
                                           if self.packed else lengths.tolist())
        batch["example_ids"] = torch.from_numpy(ids.astype(np.int64))  # to name the samples of a bad step
        return self.sp(batch)


def too_few_sequences(store: TokenStore, rows: Rows, global_batch: int, cfg: DataConfig) -> str:
    """Why one optimizer step cannot be filled, and exactly what to change."""
    head = (f"only {len(rows)} training sequences, but one optimizer step needs trainer.global_batch_size="
            f"{global_batch} of them")
    if cfg.mode != "pack" or not len(store):
        return f"{head}: lower trainer.global_batch_size or add data"
    longest, tokens = int(store.lengths.max()), int(store.lengths.sum())
    fit = 1 << max(1, (longest - 1).bit_length())  # the shortest power of two that holds the longest example
    return (f"{head}: data.mode=pack put {len(store)} examples ({tokens:,} tokens, the longest {longest}) into "
            f"sequences of data.max_seq_len={cfg.max_seq_len} tokens. Use data.max_seq_len={fit} (at least "
            f"{-(-tokens // fit)} sequences), or data.mode=pad (one example per sequence: {len(store)}), or lower "
            "trainer.global_batch_size, or add data")


class StepLoader:
    """Serves one rank's micro-batches, grouped per optimizer step."""

    def __init__(self, store: TokenStore, rows: Rows, plan: BatchPlan, rank: int,
                 cfg: DataConfig, pad_id: int, pin_memory: bool = False):
        self.store, self.rows, self.plan = store, rows, plan
        # the data-parallel replica (a group of sp x tp ranks shares its rows; tp innermost), the sequence slice
        self.rank, self.sp = rank // plan.group, SequenceSlice.of_process(rank // plan.tp_size, plan.sp_size)
        self.cfg, self.pad_id, self.pin_memory = cfg, pad_id, pin_memory
        self.steps_per_epoch = len(rows) // plan.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(too_few_sequences(store, rows, plan.global_batch_size, cfg), reason="too_small")

    def total_steps(self, epochs: float, max_steps: int) -> int:
        return max_steps if max_steps > 0 else max(1, math.ceil(epochs * self.steps_per_epoch))

    def _firsts(self, start_step: int) -> np.ndarray:
        """Position in the epoch's row order of the first row of each of this rank's micro-batches."""
        m, w, g, a = self.plan.micro_batch_size, self.plan.dp_size, self.plan.global_batch_size, self.plan.grad_accum
        s = np.arange(start_step, self.steps_per_epoch)[:, None]  # [steps, 1]
        k = np.arange(a)[None, :]  # [1, accum]
        return (s * g + (k * w + self.rank) * m).reshape(-1)

    def steps(self, epoch: int, start_step: int = 0):
        """Yield lists of ``grad_accum`` collated micro-batches, from ``start_step`` of ``epoch``."""
        order = epoch_order(len(self.rows), self.cfg.seed, epoch)
        ds = _MicroBatches(self.store, self.rows, order, self._firsts(start_step), self.plan.micro_batch_size,
                           self.cfg.mode, self.pad_id, self.sp)
        # its own generator: creating the iterator must not draw from the global RNG, or a resumed
        # run (which creates it mid-epoch) would get other dropout masks than an uninterrupted one
        generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
        loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.cfg.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False, generator=generator)
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) == self.plan.grad_accum:
                yield group
                group = []


class EvalBatches(Sequence):
    """This rank's share of the eval rows (rank::world), in micro-batches, collated when read (an eval
    split of any size costs a vector of row ids here). Every rank gets the same number of batches
    (ZeRO-3 forwards are collective): a rank that runs out repeats the first rows with every label
    ignored, which adds nothing to the loss or the token count. Under sequence parallelism ``rank`` and
    ``world`` are data-parallel (the replica and their number), every batch has ``micro`` rows (DeepSpeed's
    Ulysses attention is built for that many) and holds this rank's slice."""

    def __init__(self, store: TokenStore, rows: Rows, micro: int, rank: int, world: int, cfg: DataConfig,
                 pad_id: int, sp: SequenceSlice | None = None):
        self.store, self.rows, self.micro, self.pad_id = store, rows, micro, pad_id
        self.mode, self.sp = cfg.mode, sp or SequenceSlice()
        self.mine = np.arange(rank, len(rows), world)
        self.n = math.ceil(math.ceil(len(rows) / world) / micro)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        ids = self.mine[i * self.micro:(i + 1) * self.micro]
        real = len(ids)
        if self.sp.size > 1 or not real:  # fill with rows whose labels are all ignored
            ids = np.concatenate([ids, np.arange(self.micro - real) % len(self.rows)])
        batch = self.sp.collate(self.mode, self.store, self.rows[ids], self.pad_id)
        if real < len(ids):
            keep = torch.arange(len(ids))[:, None] < real  # [B, 1]: the real rows
            batch["labels"] = torch.where(keep, batch["labels"], IGNORE)
        return self.sp(batch)


def eval_batches(store: TokenStore, rows: Rows, micro: int, rank: int, world: int,
                 cfg: DataConfig, pad_id: int, sp_size: int = 1, tp_size: int = 1) -> EvalBatches:
    """``rank`` and ``world``: of the processes (under sequence and tensor parallelism: replica rank // (sp x tp) of
    world // (sp x tp))."""
    group = sp_size * tp_size
    return EvalBatches(store, rows, micro, rank // group, world // group, cfg, pad_id,
                       SequenceSlice.of_process(rank // tp_size, sp_size))


def with_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The supervised positions and their targets, computed on the host before the step (model.head)."""
    batch["sup_index"], batch["sup_targets"] = supervised_positions(batch["labels"])
    return batch


def summarize(name: str, stats: SplitStats) -> str:
    eff = "" if stats.packing_efficiency is None else (
        f", packing efficiency {stats.packing_efficiency:.1%} ({stats.examples_per_sequence:.1f} examples/sequence)")
    dedup = f", {stats.duplicates} duplicates removed" if stats.duplicates else ""
    kinds = [f"{stats.tool_rows:,} rows with tool calls" if stats.tool_rows else "",
             f"{stats.reasoning_turns:,} turns with reasoning" if stats.reasoning_turns else ""]
    extra = f"; {', '.join(k for k in kinds if k)}" if any(kinds) else ""
    return (f"{name}: {stats.kept}/{stats.rows_in} examples kept (dropped {stats.dropped_overlong} over-long, "
            f"{stats.dropped_short} short, {stats.dropped_unsupervised} unsupervised; truncated {stats.truncated}"
            f"{dedup}), {stats.tokens:,} tokens ({stats.supervised_tokens:,} supervised) in {stats.sequences} "
            f"sequences{eff}{extra}")
