"""Data (pack): group whole examples into rows of at most ``max_seq_len`` tokens.

Best-fit decreasing: examples are taken longest first and each goes into the open row whose
free space is the smallest that still fits it (a new row when none fits). Ties between
equal lengths are broken by a seeded permutation, so the same seed gives the same rows; the
row *count* depends only on the lengths, so every epoch has the same number of steps.
The order of rows is reshuffled every epoch (seed + epoch).

    lengths [5, 3, 4, 2], max_seq_len 8  ->  rows [[0, 1], [2, 3]]   (5+3=8, 4+2=6)
"""

from __future__ import annotations

import bisect

import numpy as np


class Rows:
    """Packed rows as two vectors (CSR): row r holds the example ids ``items[offsets[r]:offsets[r + 1]]``.

    Two int64 arrays whatever the data size (no Python list per row), so they are cached next to the
    tokens and memory-mapped like them. ``rows[r]`` is an array of example ids, ``rows[a:b]`` and
    ``rows[[r0, r1]]`` a list of them (what the collate functions take)."""

    def __init__(self, offsets: np.ndarray, items: np.ndarray):
        self.offsets, self.items = offsets, items

    @classmethod
    def of(cls, rows) -> "Rows":
        """From a list of lists of example ids (one example per row for ``data.mode=pad``)."""
        sizes = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        items = np.fromiter((i for r in rows for i in r), np.int64, int(sizes.sum()))
        return cls(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), items)

    @classmethod
    def singletons(cls, n: int) -> "Rows":
        return cls(np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, r):
        if isinstance(r, (int, np.integer)):
            return self.items[self.offsets[r]:self.offsets[r + 1]]
        idx = range(len(self))[r] if isinstance(r, slice) else r
        return [self.items[self.offsets[i]:self.offsets[i + 1]] for i in idx]

    def __iter__(self):
        return (self[r] for r in range(len(self)))

    def sizes(self) -> np.ndarray:
        """Examples per row."""
        return np.diff(self.offsets)

    def tolist(self) -> list[list[int]]:
        return [r.tolist() for r in self]


def best_fit_decreasing(lengths: np.ndarray, max_seq_len: int, seed: int) -> Rows:
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > max_seq_len:
        raise ValueError(f"an example of {lengths.max()} tokens exceeds max_seq_len {max_seq_len}")
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(lengths))
    order = np.lexsort((tiebreak, -lengths))  # longest first, seeded order among equals
    free: list[tuple[int, int]] = []  # sorted (free space, row id) of rows that can still take tokens
    row_of = np.empty(len(lengths), np.int64)  # the row each example goes to
    n_rows = 0
    for idx, n in zip(order.tolist(), lengths[order].tolist()):
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            space, row = free.pop(pos)
        else:
            space, row = max_seq_len, n_rows
            n_rows += 1
        row_of[idx] = row
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    # group by row, keeping the order in which examples were placed (longest first within a row)
    items = order[np.argsort(row_of[order], kind="stable")]
    counts = np.bincount(row_of, minlength=n_rows) if len(lengths) else np.zeros(0, np.int64)
    return Rows(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items.astype(np.int64))


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the rows (a permutation of row ids)."""
    return np.random.default_rng(seed + epoch).permutation(n_rows)
