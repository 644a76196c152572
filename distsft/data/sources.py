"""Data stage 1 (load): read local files (or hub datasets) with ``datasets`` and split off eval.

Each row keeps where it came from (``_source`` file and 1-based ``_row``) so that later stages
can name the file and row of anything that goes wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from ..config import DataConfig

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """Bad input data; the message names the file, row and field."""


def load_file(path: str) -> datasets.Dataset:
    """One file (or a saved dataset dir, or a hub name) -> Dataset with _source/_row columns."""
    p = Path(path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    elif p.suffix in BUILDERS:
        if not p.exists():
            raise DataError(f"{path}: file not found (data.train_files / data.val_files)")
        try:
            ds = datasets.load_dataset(BUILDERS[p.suffix], data_files=str(p), split="train")
        except Exception as e:  # datasets wraps decode errors without the line; find it ourselves
            where = _first_bad_json_line(p) if p.suffix == ".jsonl" else None
            raise DataError(where or f"{path}: could not be read as {p.suffix} ({type(e).__name__}: {e})") from e
    elif os.sep in path or p.suffix:
        raise DataError(f"{path}: not found or unsupported suffix (expected one of {', '.join(BUILDERS)} or a dataset dir)")
    else:  # a hub dataset name; needs a network
        ds = datasets.load_dataset(path, split="train")
    return ds.map(lambda _, i: {"_source": str(path), "_row": i + 1}, with_indices=True)


def _first_bad_json_line(path: Path) -> str | None:
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return f"{path} line {n}: not valid JSON ({e})"
            if not isinstance(row, dict):
                return f"{path} line {n}: expected a JSON object per line, got {type(row).__name__}"
    return None


def load_files(paths: list[str]) -> datasets.Dataset:
    if not paths:
        raise DataError("data.train_files is empty: give at least one file")
    parts = [load_file(p) for p in paths]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_splits(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval) rows. Eval comes from data.val_files, else a seeded data.val_fraction."""
    train = load_files(cfg.train_files)
    if cfg.val_files:
        return train, load_files(cfg.val_files)
    if cfg.val_fraction <= 0:
        return train, None
    split = train.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
    return split["train"], split["test"]
