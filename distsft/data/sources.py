"""Data stage 1 (load): read local files (or hub datasets) with ``datasets``, normalise rows to chat
messages, deal with bad rows, deduplicate, split off eval, and mix sources by weight.

Every row keeps where it came from (``_source`` file, ``_row`` = line number for .jsonl, 1-based
row index otherwise), so anything that goes wrong later names its file and row.

Mixing (``data.train_weights``, one per train file, the open-instruct convention): a weight <= 1 takes
that fraction of the file's rows, a whole number > 1 takes that many rows (repeating the file when it
is larger than the file). Eval rows are split off each file *before* weighting, so repeated rows
never leak into eval.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from .errors import DataError, Skipped
from .formats import detect, to_messages

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
KEEP = ("messages", "_source", "_row")


def _jsonl_lines(path: Path) -> tuple[list[int], bool]:
    """(numbers of the non-empty lines, whether every line is valid UTF-8). Arrow reads invalid UTF-8
    without complaint and fails later naming neither file nor line."""
    lines, utf8 = [], True
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if raw.strip():
                lines.append(n)
                if utf8:
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError:
                        utf8 = False
    return lines, utf8


def _read_jsonl_by_hand(path: Path, policy: str, skipped: Skipped) -> list[dict]:
    """Slow path when Arrow cannot read a .jsonl (bad line, types that change between rows)."""
    rows = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object per line, got {type(row).__name__}")
            except ValueError as e:  # a UnicodeDecodeError is one too
                reason, msg = _bad_line(path, n, e)
                if policy == "error":
                    raise DataError(msg, reason=reason) from None
                skipped.add(str(path), n, reason, msg)
                continue
            rows.append({**row, "_source": str(path), "_row": n})
    return rows


def _bad_line(path: Path, n: int, e: ValueError) -> tuple[str, str]:
    if isinstance(e, UnicodeDecodeError):
        return "invalid_utf8", f"{path} line {n}: not valid UTF-8 (byte {e.object[e.start]:#04x} at column {e.start + 1})"
    return "invalid_json", f"{path} line {n}: not valid JSON ({e})"


def read_rows(path: str, policy: str, skipped: Skipped) -> datasets.Dataset | list[dict]:
    """Raw rows of one file (a Dataset), or a list of dicts when only the slow path could read it."""
    p = Path(path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    elif p.suffix in BUILDERS:
        if not p.is_file():
            raise DataError(f"{path}: file not found (data.train_files / data.val_files)", reason="missing_file")
        lines, utf8 = _jsonl_lines(p) if p.suffix == ".jsonl" else ([], True)
        if not utf8:
            return _read_jsonl_by_hand(p, policy, skipped)  # names the file and line of each bad one
        try:
            ds = datasets.load_dataset(BUILDERS[p.suffix], data_files=str(p), split="train")
        except Exception as e:  # Arrow names neither line nor field; find them ourselves
            if p.suffix != ".jsonl":
                raise DataError(f"{path}: could not be read as {p.suffix} ({type(e).__name__}: {e})") from e
            return _read_jsonl_by_hand(p, policy, skipped)
        if p.suffix == ".jsonl":
            if len(ds) != len(lines):
                raise DataError(f"{path}: {len(ds)} JSON objects on {len(lines)} non-empty lines, but a .jsonl file "
                                "holds one JSON object per line (this one looks pretty-printed over several lines); "
                                f"rewrite it one object per line, e.g. `jq -c . {path} > fixed.jsonl`",
                                reason="multiline_json")
            return ds.add_column("_source", [str(p)] * len(ds)).add_column("_row", lines)
    elif os.sep in path or p.suffix:
        raise DataError(f"{path}: not found or unsupported suffix (expected one of {', '.join(BUILDERS)} "
                        "or a saved dataset directory)", reason="missing_file")
    else:  # a hub dataset name; needs a network
        ds = datasets.load_dataset(path, split="train")
    return ds.add_column("_source", [str(path)] * len(ds)).add_column("_row", list(range(1, len(ds) + 1)))


def normalise(raw, fmt: str, policy: str, skipped: Skipped, source: str) -> datasets.Dataset:
    """Rows -> Dataset(messages, _source, _row); bad rows raise (policy error) or are recorded (skip)."""
    columns = raw.column_names if isinstance(raw, datasets.Dataset) else sorted({k for r in raw for k in r})
    fmt = detect(columns, source) if fmt == "auto" else fmt

    def convert(row):
        try:
            return {"messages": to_messages(row, fmt), "_error": ""}
        except DataError as e:
            if policy == "error":
                raise
            return {"messages": [], "_error": f"{e.reason}\t{e}"}

    if isinstance(raw, list):
        out = [{**convert(r), "_source": r["_source"], "_row": r["_row"]} for r in raw]
        ds = datasets.Dataset.from_list(out) if out else datasets.Dataset.from_dict(
            {"messages": [], "_error": [], "_source": [], "_row": []})
    else:
        ds = raw.map(convert, remove_columns=[c for c in raw.column_names if c not in KEEP[1:]], desc="format")
    # find the bad rows in Arrow (a vector of flags), without reading every row into Python
    bad = np.flatnonzero(pc.binary_length(ds.data.column("_error")).to_numpy(zero_copy_only=False) > 0) \
        if len(ds) else np.zeros(0, np.int64)
    if len(bad):
        for r in ds.select(bad):
            reason, msg = r["_error"].split("\t", 1)
            skipped.add(r["_source"], r["_row"], reason, msg)
        ds = ds.select(np.setdiff1d(np.arange(len(ds)), bad))
    return ds.remove_columns("_error")


def load_source(path: str, fmt: str, policy: str, skipped: Skipped) -> datasets.Dataset:
    return normalise(read_rows(path, policy, skipped), fmt, policy, skipped, path)


def dedup(parts: list[datasets.Dataset]) -> tuple[list[datasets.Dataset], int]:
    """Drop exact duplicate conversations across all parts (first occurrence wins). Conversations are
    compared by a 128-bit hash, read in batches: memory is 16 bytes per row, not the rows themselves."""
    hashes = []
    for ds in parts:
        h = np.zeros((len(ds), 2), np.uint64)
        for start, batch in zip(range(0, len(ds), 1000), ds.select_columns(["messages"]).iter(batch_size=1000)):
            for i, msgs in enumerate(batch["messages"]):
                key = json.dumps(msgs, sort_keys=True, ensure_ascii=False).encode()
                h[start + i] = np.frombuffer(hashlib.blake2b(key, digest_size=16).digest(), np.uint64)
        hashes.append(h)
    allh = np.concatenate(hashes) if hashes else np.zeros((0, 2), np.uint64)
    _, first = np.unique(allh, axis=0, return_index=True)
    keep = np.zeros(len(allh), bool)
    keep[first] = True  # np.unique returns the first index of each distinct hash
    out, dropped, at = [], 0, 0
    for ds in parts:
        mine = np.flatnonzero(keep[at:at + len(ds)])
        at += len(ds)
        dropped += len(ds) - len(mine)
        out.append(ds.select(mine) if len(mine) < len(ds) else ds)
    return out, dropped


def apply_weight(ds: datasets.Dataset, weight: float, seed: int, key: str) -> datasets.Dataset:
    n = len(ds)
    if weight <= 0 or (weight > 1 and weight != int(weight)):
        raise DataError(f"{key}={weight}: expected a fraction in (0, 1] or a whole row count > 1",
                        reason="config")
    if weight == 1 or n == 0:
        return ds
    rng = np.random.default_rng(seed)
    if weight < 1:
        return ds.select(np.sort(rng.permutation(n)[: max(1, round(weight * n))]))
    count = int(weight)  # repeat whole copies, then a random remainder
    idx = np.concatenate([np.tile(np.arange(n), count // n), np.sort(rng.permutation(n)[: count % n])])
    return ds.select(idx)
