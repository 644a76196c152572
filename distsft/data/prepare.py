"""Data stages 1-3 together, cached: load -> normalise -> dedup -> split -> mix -> tokenize + mask -> filter.

The result (flat token arrays and statistics per split) is cached on disk under a key made of the
data files' content hashes, the tokenizer, the chat template and every data option that changes
tokens, so a restart, or a second rank, reads it instead of tokenizing again. Only the main process
builds it (the caller holds the others back with ``main_process_first``); a change to any input
makes a new key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from ..config import DataConfig
from .collate import TokenStore
from .formats import where
from .sources import DataError, Skipped, apply_weight, dedup, load_source
from .templates import resolve_template
from .tokenize import IGNORE, TemplateError, tokenize_messages

log = logging.getLogger(__name__)
CACHE_VERSION = 1
datasets.disable_progress_bars()  # one line of statistics per split is logged instead


@dataclass
class SplitStats:
    rows_in: int = 0
    kept: int = 0
    duplicates: int = 0
    dropped_overlong: int = 0
    dropped_short: int = 0
    dropped_unsupervised: int = 0
    truncated: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    sequences: int = 0  # filled in by packing
    packing_efficiency: float | None = None  # real tokens / (sequences x max_seq_len); None when padded
    examples_per_sequence: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    train: TokenStore
    train_stats: SplitStats
    eval: TokenStore | None
    eval_stats: SplitStats | None
    skipped: Skipped = field(default_factory=Skipped)
    template: str = ""
    cache_hit: bool = False
    fingerprint: str = ""  # hash of the data files' content and every option that changes tokens


def _digest_file(path: Path, h) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def cache_key(cfg: DataConfig, tokenizer, template: str) -> str:
    h = hashlib.sha256()
    opts = {k: v for k, v in asdict(cfg).items() if k not in ("num_workers", "num_proc", "cache_dir", "mode")}
    h.update(json.dumps({"v": CACHE_VERSION, "cfg": opts, "template": template,
                         "special": tokenizer.special_tokens_map}, sort_keys=True, default=str).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer")
             else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for f in [*cfg.train_files, *cfg.val_files]:
        p = Path(f)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p] if p.is_file() else []
        h.update(f.encode())
        for x in files:
            _digest_file(x, h)
    return h.hexdigest()[:24]


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("DISTSFT_CACHE", Path.home() / ".cache" / "distsft")) / "tokenized"


def _load_splits(cfg: DataConfig, skipped: Skipped):
    """(train parts per file, eval Dataset | None, duplicates removed)."""
    if cfg.train_weights and len(cfg.train_weights) != len(cfg.train_files):
        raise DataError(f"data.train_weights has {len(cfg.train_weights)} entries for {len(cfg.train_files)} "
                        "data.train_files", reason="config")
    if not cfg.train_files:
        raise DataError("data.train_files is empty: give at least one file", reason="config")
    parts = [load_source(f, cfg.format, cfg.bad_rows, skipped) for f in cfg.train_files]
    dups = 0
    if cfg.dedup:
        parts, dups = dedup(parts)
    evals = [load_source(f, cfg.format, cfg.bad_rows, skipped) for f in cfg.val_files]
    if not cfg.val_files and cfg.val_fraction > 0:
        split = [p.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed) if len(p) > 1 else None
                 for p in parts]
        parts = [s["train"] if s else p for s, p in zip(split, parts)]
        evals = [s["test"] for s in split if s]
    weights = cfg.train_weights or [1.0] * len(parts)
    parts = [apply_weight(p, w, cfg.seed + i, f"data.train_weights[{i}]") for i, (p, w) in enumerate(zip(parts, weights))]
    eval_ds = datasets.concatenate_datasets(evals) if evals else None
    return datasets.concatenate_datasets(parts), eval_ds, dups


def tokenize_split(ds: datasets.Dataset, cfg: DataConfig, tokenizer, template: str, template_name: str,
                   stats: SplitStats) -> TokenStore:
    if not len(ds):  # every row skipped (or an empty file): nothing to tokenize
        return TokenStore([], [], [], [])

    def encode(row):
        try:
            return tokenize_messages(tokenizer, row["messages"], cfg.loss_on, template, template_name)
        except TemplateError as e:
            raise TemplateError(f"{where(row)}: {e}", reason=e.reason) from None

    enc = ds.map(encode, remove_columns=["messages"], num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                 desc="tokenize", load_from_cache_file=False)
    stats.rows_in = len(ds)
    kept_ids, kept_labels, kept_src, kept_row = [], [], [], []
    for x, y, src, row in zip(enc["input_ids"], enc["labels"], enc["_source"], enc["_row"]):
        if len(x) > cfg.max_seq_len:
            if cfg.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            x, y = x[: cfg.max_seq_len], y[: cfg.max_seq_len]
            stats.truncated += 1
        if len(x) < cfg.min_tokens:
            stats.dropped_short += 1
            continue
        if all(t == IGNORE for t in y):
            stats.dropped_unsupervised += 1
            continue
        kept_ids.append(x)
        kept_labels.append(y)
        kept_src.append(src)
        kept_row.append(row)
    store = TokenStore(kept_ids, kept_labels, kept_src, kept_row)
    stats.kept, stats.tokens = len(store), int(store.lengths.sum())
    stats.supervised_tokens = int(store.supervised().sum())
    return store


def _build(cfg: DataConfig, tokenizer, template: str, template_name: str) -> Prepared:
    skipped = Skipped()
    train_ds, eval_ds, dups = _load_splits(cfg, skipped)
    train_stats = SplitStats(duplicates=dups)
    train = tokenize_split(train_ds, cfg, tokenizer, template, template_name, train_stats)
    if not len(train):
        raise DataError(f"no usable training examples in {cfg.train_files}: {train_stats.dropped_overlong} longer "
                        f"than data.max_seq_len={cfg.max_seq_len}, {train_stats.dropped_unsupervised} without "
                        f"supervised tokens, {train_stats.dropped_short} shorter than data.min_tokens, "
                        f"{len(skipped.rows)} bad rows skipped {skipped.counts() or ''}".rstrip(), reason="empty")
    ev, ev_stats = None, None
    if eval_ds is not None and len(eval_ds):
        ev_stats = SplitStats()
        ev = tokenize_split(eval_ds, cfg, tokenizer, template, template_name, ev_stats)
        ev = ev if len(ev) else None
    return Prepared(train, train_stats, ev, ev_stats if ev is not None else None, skipped, template)


def _save(prep: Prepared, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prep.train.save(tmp / "train.npz")
    if prep.eval is not None:
        prep.eval.save(tmp / "eval.npz")
    meta = {"train_stats": prep.train_stats.as_dict(),
            "eval_stats": prep.eval_stats.as_dict() if prep.eval_stats else None,
            "skipped": prep.skipped.rows}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        tmp.rename(path)  # atomic: a reader sees the whole entry or none
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path, template: str) -> Prepared:
    meta = json.loads((path / "meta.json").read_text())
    ev = TokenStore.load(path / "eval.npz") if (path / "eval.npz").exists() else None
    return Prepared(TokenStore.load(path / "train.npz"), SplitStats(**meta["train_stats"]), ev,
                    SplitStats(**meta["eval_stats"]) if meta["eval_stats"] else None,
                    Skipped(meta["skipped"]), template, cache_hit=True)


def prepare(cfg: DataConfig, tokenizer, tokenizer_name: str = "the tokenizer") -> Prepared:
    """Tokenized train/eval stores and statistics for this config, from the cache when possible."""
    template_name = f"data.chat_template={cfg.chat_template}" if cfg.chat_template else \
        f"the chat template of {tokenizer_name}"
    template = resolve_template(cfg.chat_template, tokenizer, tokenizer_name)
    key = cache_key(cfg, tokenizer, template)
    path = cache_root(cfg) / key if cfg.cache else None
    if path is not None and (path / "meta.json").exists():
        log.info("tokenized data from cache %s", path)
        prep = _load(path, template)
    else:
        prep = _build(cfg, tokenizer, template, template_name)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(prep, path)
    prep.fingerprint = key
    return prep
