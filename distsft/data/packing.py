"""Data stage 4 (pack): group whole examples into rows of at most ``max_seq_len`` tokens.

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


def best_fit_decreasing(lengths: np.ndarray, max_seq_len: int, seed: int) -> list[list[int]]:
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > max_seq_len:
        raise ValueError(f"an example of {lengths.max()} tokens exceeds max_seq_len {max_seq_len}")
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(lengths))
    order = np.lexsort((tiebreak, -lengths))  # longest first, seeded order among equals
    free: list[tuple[int, int]] = []  # sorted (free space, row id) of rows that can still take tokens
    rows: list[list[int]] = []
    for idx in order.tolist():
        n = int(lengths[idx])
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            space, row = free.pop(pos)
        else:
            space, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(idx)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


def epoch_rows(rows: list[list[int]], seed: int, epoch: int) -> list[list[int]]:
    """The rows in the order epoch ``epoch`` visits them."""
    perm = np.random.default_rng(seed + epoch).permutation(len(rows))
    return [rows[i] for i in perm.tolist()]
