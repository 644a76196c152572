"""Data stage, on the side of the pipeline: the prompts of the sample generations (``logging.sample_every``)
when ``logging.sample_prompts`` is empty. They come from the user's own data:

    the first user turn of the first rows of data.val_files, else of data.train_files (file by file, top rows
    first), read in the data's own format (data.format, or detected from the file's columns)

A .jsonl file is read line by line from its top (a large file is not loaded for three prompts); other files
and hub datasets go through the loader of data stage 1 (``sources.read_rows``). Rows that do not convert, have
no user turn, or whose first user turn is longer than ``LONGEST`` characters are passed over: a sample is a
glance at what the model answers, not a long-context test. Every rank reads the same rows, so every rank
generates for the same prompts (ZeRO-3 and FSDP generate collectively).
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from ..config import DataConfig
from .errors import DataError, Skipped
from .formats import detect, to_messages
from .sources import read_rows

LONGEST = 1000  # characters of a prompt taken from the data
SCAN = 64  # rows read from the top of each file at most


def data_prompts(cfg: DataConfig, count: int) -> list[tuple[str, str]]:
    """Up to ``count`` (prompt, 'file row N') pairs from the eval files, else the training files."""
    found: list[tuple[str, str]] = []
    for path in [*cfg.val_files, *cfg.train_files]:
        found += _prompts_of(path, cfg.format, count - len(found))
        if len(found) >= count:
            break
    return found


def _prompts_of(path: str, fmt: str, count: int) -> list[tuple[str, str]]:
    """Up to ``count`` (prompt, 'file row N') pairs from the top rows of one file."""
    out: list[tuple[str, str]] = []
    rows = list(_head(path))
    try:
        fmt = detect(list(rows[0]), path) if rows and fmt == "auto" else fmt
    except DataError:  # no known format: nothing to ask from this file
        return out
    for row in rows:
        try:
            messages = to_messages(row, fmt)
        except DataError:
            continue
        prompt = next((m["content"] for m in messages if m["role"] == "user"), "").strip()
        if prompt and len(prompt) <= LONGEST:
            out.append((prompt, f"{row['_source']} row {row['_row']}"))
            if len(out) == count:
                break
    return out


def _head(path: str):
    """The first SCAN rows of one file (dicts with _source and _row), bad lines passed over."""
    p = Path(path)
    if p.suffix == ".jsonl" and p.is_file():
        with p.open("rb") as f:
            for n, raw in islice(((n, raw) for n, raw in enumerate(f, start=1) if raw.strip()), SCAN):
                try:
                    row = json.loads(raw.decode("utf-8"))
                except ValueError:  # a UnicodeDecodeError is one too
                    continue
                if isinstance(row, dict):
                    yield {**row, "_source": str(p), "_row": n}
        return
    try:
        rows = read_rows(path, "skip", Skipped())
    except DataError:
        return
    yield from (rows[i] for i in range(min(SCAN, len(rows))))
