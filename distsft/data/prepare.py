"""Data stages 1-4 together, streamed and cached: load -> normalise -> dedup -> split -> mix ->
tokenize + mask -> filter -> store -> pack.

The result is a token cache entry (see ``store.py``: shards of plain arrays plus ``index.json``)
under a key made of the data files' content hashes (a hub dataset: the commit its revision points at),
the tokenizer, the chat template, every data option that changes tokens, and the versions of the code
that renders and tokenizes (``token_versions``: this cache format, distsft, transformers, tokenizers,
jinja2), so a restart, or another rank, maps it instead of tokenizing again::

    <cache>/tokenized/<key>/index.json                  splits, shards, byte sizes, statistics, bad rows
    <cache>/tokenized/<key>/train-00000.tokens.npy ...  one shard per data.shard_size conversations
    <cache>/tokenized/<key>/train.pack.{offsets,items}.npy   the packed rows (best-fit decreasing)

Preparation streams: rows stay in Arrow files (memory-mapped by ``datasets``), and each shard of
``data.shard_size`` conversations is rendered, tokenized, masked and written by one worker process
(``data.num_proc`` of them, forked), so peak memory is set by the shard, not by the data. An entry
is built in a temporary directory and renamed into place when complete: a reader sees all of it or
nothing, and one whose files do not match the sizes in its index is rebuilt, never trusted. A write that fails
(a full disk; ``entry.writing``) removes the temporary directory and stops in one line naming the entry.

On a cluster the first process of each node builds the entry, or reads it when it is already
there (a shared filesystem); the other processes of the node wait for it (``entry.wait_for``), at most
``data.prepare_timeout`` seconds, and stop with the builder's error if it failed.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np

from ..config import DataConfig
from . import cachekey
from .cachekey import cache_key, cache_root, token_versions
from .chatview import reasoning_mode, written_warning
from .entry import failed_marker, read_entry, wait_for, writing
from .multiturn import split_per_turn
from .packing import Rows, best_fit_decreasing
from .sources import DataError, Skipped, apply_weight, dedup, load_source, log_mixing
from .store import LENGTH, SUPERVISED, TokenStore, token_dtype, write_shard
from .templates import resolve_template
from .tokenize import encode_conversations

log = logging.getLogger(__name__)
ENCODE_BATCH = 64  # conversations rendered and encoded together inside a shard
CACHE_HINT = "data.cache_dir, or DISTSFT_CACHE, chooses where the token cache lives; data.cache=false skips it"
datasets.disable_progress_bars()  # one line of statistics per split is logged instead


@dataclass
class SplitStats:
    rows_in: int = 0
    per_turn_examples: int = 0  # examples data.multiturn=per_turn made of the rows (one per assistant turn)
    kept: int = 0
    duplicates: int = 0
    dropped_overlong: int = 0
    dropped_short: int = 0
    dropped_unsupervised: int = 0
    truncated: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    tool_rows: int = 0  # rows with tools or tool calls
    reasoning_turns: int = 0  # assistant turns with a reasoning field (reasoning_content / thinking)
    sequences: int = 0  # filled in by packing
    packing_efficiency: float | None = None  # real tokens / (sequences x max_seq_len); None when padded
    examples_per_sequence: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def add(self, counts: dict) -> None:
        for k, v in counts.items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class Prepared:
    train: TokenStore
    train_stats: SplitStats
    eval: TokenStore | None
    eval_stats: SplitStats | None
    skipped: Skipped = field(default_factory=Skipped)
    template: str = ""
    cache_hit: bool = False
    fingerprint: str = ""  # hash of the data files' content and every option (and version) that changes tokens
    sources: list[dict] = field(default_factory=list)  # per train file: rows read, duplicates, eval, weight, kept
    seconds: float = 0.0  # wall time of preparation (reading a cache entry included)


def _load_splits(cfg: DataConfig, skipped: Skipped):
    """(train Dataset, eval Dataset | None, duplicates removed, per train file: its rows read, duplicates
    dropped, rows held out for eval, weight (None without data.train_weights) and rows kept)."""
    if cfg.train_weights and len(cfg.train_weights) != len(cfg.train_files):
        raise DataError(f"data.train_weights has {len(cfg.train_weights)} entries for {len(cfg.train_files)} "
                        "data.train_files", reason="config")
    if not cfg.train_files:
        raise DataError("data.train_files is empty: give at least one file", reason="config")
    parts = [load_source(f, cfg.format, cfg.bad_rows, skipped) for f in cfg.train_files]
    counts = [{"file": f, "read": len(p)} for f, p in zip(cfg.train_files, parts)]
    dups = 0
    if cfg.dedup:
        parts, dups = dedup(parts)
    for c, p in zip(counts, parts):
        c["duplicates"] = c["read"] - len(p)
    evals = [load_source(f, cfg.format, cfg.bad_rows, skipped) for f in cfg.val_files]
    if not cfg.val_files and cfg.val_fraction > 0:
        split = [p.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed) if len(p) > 1 else None
                 for p in parts]
        parts = [s["train"] if s else p for s, p in zip(split, parts)]
        evals = [s["test"] for s in split if s]
    weights = cfg.train_weights or [1.0] * len(parts)
    for c, p, w in zip(counts, parts, weights):
        c.update(eval=c["read"] - c["duplicates"] - len(p), weight=w if cfg.train_weights else None)
    parts = [apply_weight(p, w, cfg.seed + i, f"data.train_weights[{i}]")
             for i, (p, w) in enumerate(zip(parts, weights))]
    for c, p in zip(counts, parts):
        c["kept"] = len(p)
    eval_ds = datasets.concatenate_datasets(evals) if evals else None
    return datasets.concatenate_datasets(parts), eval_ds, dups, counts


# ---- one shard: render, tokenize, mask, filter, write (in a worker process or in this one) ----------

_JOB: dict = {}  # what the forked workers need; set before the pool starts (nothing is pickled per task)


def _tokenize_shard(k: int) -> tuple[dict, dict]:
    """Shard k of the job's split -> (its index entry, its statistics)."""
    j = _JOB
    cfg: DataConfig = j["cfg"]
    size = j["shard_size"]
    lo, hi = k * size, min((k + 1) * size, len(j["ds"]))
    ids_out, masks_out, examples = [], [], []
    counts = dict(rows_in=hi - lo, per_turn_examples=0, kept=0, dropped_overlong=0, dropped_short=0,
                  dropped_unsupervised=0, truncated=0, tokens=0, supervised_tokens=0, tool_rows=0, reasoning_turns=0)
    for b in range(lo, hi, ENCODE_BATCH):
        rows = j["ds"][b:min(b + ENCODE_BATCH, hi)]
        src, row_no, convs, tools = rows["_source"], rows["_row"], rows["messages"], rows["tools"]
        counts["tool_rows"] += sum(bool(t) or any(m["tool_calls"] for m in c) for c, t in zip(convs, tools))
        counts["reasoning_turns"] += sum(m["reasoning_content"] is not None for c in convs for m in c)
        origin, loss_on = list(range(len(convs))), cfg.loss_on
        if cfg.multiturn == "per_turn":  # one example per assistant turn, each supervising its last turn
            convs, origin = split_per_turn(convs)
            counts["per_turn_examples"] += len(convs)
            loss_on = "last_assistant"
        encoded = encode_conversations(j["tokenizer"], convs, loss_on, j["template"], j["template_name"],
                                       where=lambda i: f"{src[origin[i]]} row {row_no[origin[i]]}",
                                       tools=[tools[o] for o in origin], reasoning=cfg.train_on_reasoning)
        for i, (ids, sup) in enumerate(encoded):
            if len(ids) > cfg.max_seq_len:
                if cfg.overlong == "drop":
                    counts["dropped_overlong"] += 1
                    continue
                ids, sup = ids[:cfg.max_seq_len], sup[:cfg.max_seq_len]
                counts["truncated"] += 1
            if len(ids) < cfg.min_tokens:
                counts["dropped_short"] += 1
                continue
            n_sup = int(sup.sum())
            if not n_sup:
                counts["dropped_unsupervised"] += 1
                continue
            ids_out.append(ids)
            masks_out.append(sup)
            examples.append((len(ids), n_sup, j["sources"][src[origin[i]]], row_no[origin[i]]))
    ex = np.array(examples, np.int64).reshape(-1, 4)
    counts.update(kept=len(ex), tokens=int(ex[:, LENGTH].sum()), supervised_tokens=int(ex[:, SUPERVISED].sum()))
    entry = write_shard(j["dir"], f"{j['split']}-{k:05d}", ids_out, masks_out, ex, j["dtype"])
    return entry, counts


def default_num_proc() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 32))


def shard_size(rows: int, most: int, procs: int) -> int:
    """Conversations per shard: at most ``data.shard_size``, and small enough that every worker gets about four
    shards (5 shards on 2 workers would leave one idle for the last; 1/4 of a shard is the most it idles)."""
    if procs <= 1:
        return most
    return max(1, min(most, math.ceil(rows / (4 * procs))))


def tokenize_split(ds: datasets.Dataset, cfg: DataConfig, tokenizer, template: str, template_name: str,
                   directory: Path, split: str, sources: dict[str, int], stats: SplitStats) -> list[dict]:
    """Write ``split``'s shards into ``directory``; -> their index entries (statistics into ``stats``)."""
    procs = cfg.num_proc or default_num_proc()
    size = shard_size(len(ds), cfg.shard_size, procs)
    n_shards = math.ceil(len(ds) / size)
    vocab = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1)
    _JOB.update(ds=ds, cfg=cfg, tokenizer=tokenizer, template=template, template_name=template_name,
                dir=directory, split=split, sources=sources, dtype=token_dtype(vocab), shard_size=size)
    procs = min(procs, n_shards)
    try:
        if procs <= 1:
            results = [_tokenize_shard(k) for k in range(n_shards)]
        else:
            # fork: the workers inherit the dataset (memory-mapped Arrow) and the tokenizer; each encodes
            # on one thread (the processes are the parallelism), and the parent's tokenizer is untouched
            env = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                with mp.get_context("fork").Pool(procs) as pool:
                    results = list(pool.imap(_tokenize_shard, range(n_shards)))  # in shard order
            finally:
                if env is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = env
    finally:
        _JOB.clear()
    for _, counts in results:
        stats.add(counts)
    return [entry for entry, _ in results]


def _pack_plan(store: TokenStore, cfg: DataConfig, directory: Path, split: str) -> dict:
    rows = best_fit_decreasing(store.lengths, cfg.max_seq_len, cfg.seed)
    files = {}
    for kind, arr in (("offsets", rows.offsets), ("items", rows.items)):
        np.save(directory / f"{split}.pack.{kind}.npy", arr)
        name = f"{split}.pack.{kind}.npy"
        files[kind] = {"file": name, "bytes": (directory / name).stat().st_size}
    return {"max_seq_len": cfg.max_seq_len, "seed": cfg.seed, "files": files}


def _build(cfg: DataConfig, tokenizer, template: str, template_name: str, directory: Path) -> dict:
    """Write a complete entry into ``directory``; -> its index."""
    skipped = Skipped()
    train_ds, eval_ds, dups, counts = _load_splits(cfg, skipped)
    files = [*cfg.train_files, *cfg.val_files]
    names = sorted({*files, *(str(Path(f)) for f in files)})  # rows name their file as given or normalised
    sources = {n: i for i, n in enumerate(names)}
    index = {"version": cachekey.CACHE_VERSION, "versions": token_versions(), "source_names": names, "sources": counts,
             "splits": {}}
    for split, ds in (("train", train_ds), ("eval", eval_ds)):
        if ds is None or (split == "eval" and not len(ds)):
            continue
        stats = SplitStats(duplicates=dups if split == "train" else 0)
        shards = tokenize_split(ds, cfg, tokenizer, template, template_name, directory, split, sources, stats)
        entry = {"shards": shards, "stats": stats.as_dict()}
        store = TokenStore.open(directory, entry, names)
        if split == "train" and not len(store):
            raise DataError(f"no usable training examples in {cfg.train_files}: {stats.dropped_overlong} longer "
                            f"than data.max_seq_len={cfg.max_seq_len}, {stats.dropped_unsupervised} without "
                            f"supervised tokens, {stats.dropped_short} shorter than data.min_tokens, "
                            f"{len(skipped.rows)} bad rows skipped {skipped.counts() or ''}".rstrip(), reason="empty")
        if len(store):
            entry["pack"] = _pack_plan(store, cfg, directory, split)
            index["splits"][split] = entry
    index["skipped"] = skipped.rows
    (directory / "index.json").write_text(json.dumps(index))
    return index


def _open(directory: Path, index: dict, template: str, cache_hit: bool) -> Prepared:
    names = index["source_names"]
    split = {}
    for name, entry in index["splits"].items():
        store = TokenStore.open(directory, entry, names)
        pack = entry["pack"]
        store.packed = {(pack["max_seq_len"], pack["seed"]): Rows(
            *(np.load(directory / pack["files"][k]["file"], mmap_mode="r") for k in ("offsets", "items")))}
        split[name] = (store, SplitStats(**entry["stats"]))
    ev = split.get("eval", (None, None))
    return Prepared(split["train"][0], split["train"][1], ev[0], ev[1], Skipped(index["skipped"]), template,
                    cache_hit=cache_hit, sources=index["sources"])


def build_entry(cfg: DataConfig, tokenizer, template: str, template_name: str, path: Path) -> dict:
    """Build the entry at ``path`` atomically (temporary directory, then rename); -> its index."""
    with writing(path, CACHE_HINT):
        path.parent.mkdir(parents=True, exist_ok=True)
        failed_marker(path).unlink(missing_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp", dir=path.parent))
    try:
        with writing(path, CACHE_HINT):
            index = _build(cfg, tokenizer, template, template_name, tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # the node's other processes stop with this message instead of waiting for their timeout
            failed_marker(path).write_text(f"{socket.gethostname()} pid {os.getpid()}: {type(e).__name__}: {e}")
        except OSError:
            pass
        raise
    try:
        tmp.rename(path)  # atomic: a reader sees the whole entry or none
    except OSError:  # another process (another node on a shared filesystem) finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return json.loads((path / "index.json").read_text())
    return index


def prepare(cfg: DataConfig, tokenizer, tokenizer_name: str = "the tokenizer", builder: bool = True) -> Prepared:
    """Tokenized train/eval stores and statistics for this config, from the cache when possible.

    ``builder=False`` (a process that is not the first of its node) waits for the entry that the
    builder writes instead of building it too."""
    start = time.perf_counter()
    template_name = f"data.chat_template={cfg.chat_template}" if cfg.chat_template else \
        f"the chat template of {tokenizer_name}"
    template = resolve_template(cfg.chat_template, tokenizer, tokenizer_name)
    if builder and "strftime_now" in template:  # the node's first process speaks for it
        log.warning("%s reads today's date (strftime_now): its tokens depend on the day they are built, and the "
                    "token cache, whose key has no date, serves the tokens of the day its entry was built, which "
                    "may be another day's; for tokens that do not depend on the date, use a copy of the template "
                    "with the date written in (data.chat_template=<file>.jinja)", template_name)
    key = cache_key(cfg, tokenizer, template)
    if not cfg.cache:  # an entry of our own in a temporary directory, removed once mapped
        with writing(Path(tempfile.gettempdir()), "data.cache=false writes it into the temporary directory, TMPDIR"):
            tmp = Path(tempfile.mkdtemp(prefix="distsft-tokens-"))
        try:
            with writing(tmp, "data.cache=false writes it into the temporary directory, TMPDIR"):
                prep = _open(tmp, _build(cfg, tokenizer, template, template_name, tmp), template, cache_hit=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # mapped files stay readable until unmapped
    else:
        path = cache_root(cfg) / key
        index = read_entry(path) if (path / "index.json").exists() else None
        hit = index is not None or not builder  # a waiting process reads what its node's first one built
        if index is None:
            index = build_entry(cfg, tokenizer, template, template_name, path) if builder else \
                wait_for(path, cfg.prepare_timeout)
        if hit:
            log.info("tokenized data from cache %s", path)
        prep = _open(path, index, template, cache_hit=hit)
    prep.fingerprint = key
    if builder:  # read from the entry, so a cache hit says it too
        log_mixing(prep.sources)
        turns = prep.train_stats.reasoning_turns + (prep.eval_stats.reasoning_turns if prep.eval_stats else 0)
        mode = reasoning_mode(lambda m: tokenizer.apply_chat_template(m, chat_template=template, tokenize=False),
                              ("prepare", id(tokenizer), template)) if turns else "field"
        if warning := written_warning(turns, mode, template_name):
            log.warning(warning)
    prep.seconds = time.perf_counter() - start
    return prep
