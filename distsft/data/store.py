"""Data (store): tokenized examples as plain arrays on disk, memory-mapped by every rank.

A split is a list of shards, each written once by the process that tokenized it::

    train-00000.tokens.npy     [T] uint16 | int32   token ids of all examples of the shard, concatenated
    train-00000.mask.npy       [T] bool             supervised (label = token) or not (label = -100)
    train-00000.examples.npy   [N, 4] int64         per example: length, supervised tokens, source, row

``index.json`` next to them names the shards, their sizes, the source files and the statistics; it
is the only metadata (no pickle). Opening a store maps the token and mask files read-only, so the
ranks of a node share one page cache, and keeps only the per-example vectors (offsets, lengths,
origin: ~30 bytes per example) in memory. Example *i* of shard *k*::

    tokens[offsets[i] - base[k] : offsets[i + 1] - base[k]]      (base[k]: tokens before shard k)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tokenize import IGNORE

LENGTH, SUPERVISED, SOURCE, ROW = range(4)  # columns of <shard>.examples.npy


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def write_shard(directory: Path, name: str, ids: list[np.ndarray], masks: list[np.ndarray],
                examples: np.ndarray, dtype: np.dtype) -> dict:
    """Write one shard's three arrays; -> its entry in the index (names and byte sizes)."""
    files = {}
    for kind, arr in (("tokens", np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)),
                      ("mask", np.concatenate(masks) if masks else np.zeros(0, bool)),
                      ("examples", examples.reshape(-1, 4).astype(np.int64))):
        path = directory / f"{name}.{kind}.npy"
        np.save(path, arr)
        files[kind] = {"file": path.name, "bytes": path.stat().st_size}
    return {"name": name, "examples": int(len(examples)), "tokens": int(examples[:, LENGTH].sum()) if len(examples)
            else 0, "files": files}


class TokenStore:
    """Tokenized examples (token ids + supervised mask) in shards, with the file and row every example
    came from (to name the samples of a bad step). Built in memory from lists (tests, benchmarks), or
    opened from a token cache with :meth:`open` (memory-mapped)."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]],
                 sources: list[str] | None = None, rows: list[int] | None = None):
        ids = [np.asarray(x, np.int64) for x in input_ids]
        sup = [np.asarray(y, np.int64) != IGNORE for y in labels]
        names = sorted(set(sources or []))
        ex = np.zeros((len(ids), 4), np.int64)
        ex[:, LENGTH] = [len(x) for x in ids]
        ex[:, SUPERVISED] = [int(m.sum()) for m in sup]
        ex[:, SOURCE] = [names.index(s) for s in sources] if sources else 0
        ex[:, ROW] = rows if rows is not None else np.arange(1, len(ids) + 1)
        def cat(arrays: list, dtype) -> np.ndarray:
            return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)

        self._setup([(cat(ids, np.int64), cat(sup, bool), ex)], names)

    def _setup(self, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]], source_names: list[str]) -> None:
        self._tokens = [t for t, _, _ in shards]
        self._masks = [m for _, m, _ in shards]
        ex = np.concatenate([e for _, _, e in shards]) if shards else np.zeros((0, 4), np.int64)
        self.lengths = np.ascontiguousarray(ex[:, LENGTH])
        self.n_supervised = np.ascontiguousarray(ex[:, SUPERVISED])
        self.source_idx = ex[:, SOURCE].astype(np.int32)
        self.rows = np.ascontiguousarray(ex[:, ROW])
        self.source_names = list(source_names)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        counts = np.array([len(e) for _, _, e in shards], np.int64)
        self._first = np.concatenate([[0], np.cumsum(counts)])[:-1]  # first example of each shard
        self._base = self.offsets[self._first]  # tokens before each shard
        self.packed: dict = {}  # (max_seq_len, seed) -> Rows, when the cache holds the packed rows

    @classmethod
    def open(cls, directory: Path, split: dict, source_names: list[str]) -> "TokenStore":
        """The split described by ``split`` (its index entry), memory-mapped from ``directory``."""
        store = cls.__new__(cls)
        shards = []
        for s in split["shards"]:
            f = s["files"]
            shards.append((np.load(directory / f["tokens"]["file"], mmap_mode="r"),
                           np.load(directory / f["mask"]["file"], mmap_mode="r"),
                           np.load(directory / f["examples"]["file"])))
        store._setup(shards, source_names)
        return store

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of example i, int64; labels are -100 where not supervised."""
        k = int(np.searchsorted(self._first, i, side="right")) - 1
        s, e = self.offsets[i] - self._base[k], self.offsets[i + 1] - self._base[k]
        ids = np.asarray(self._tokens[k][s:e], np.int64)
        return ids, np.where(self._masks[k][s:e], ids, IGNORE)

    def origin(self, i: int) -> str:
        """'file row N' of example i."""
        name = self.source_names[self.source_idx[i]] if self.source_names else "?"
        return f"{name} row {self.rows[i]}"

    def supervised(self) -> np.ndarray:
        """Supervised tokens per example."""
        return self.n_supervised
