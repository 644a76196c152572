"""Data (load): read local files (or hub datasets) with ``datasets``, normalise rows to chat
messages, deal with bad rows, deduplicate, split off eval, and mix sources by weight.

Every row keeps where it came from (``_source`` file, ``_row`` = line number for .jsonl, 1-based
row index otherwise), so anything that goes wrong later names its file and row.

A hub dataset is named ``owner/name`` (or ``name``), optionally pinned as ``owner/name@revision`` (a
branch, tag or commit). Its revision is resolved to the commit it points at once per process
(``hub_commit``), and that commit is both what the token cache key records and what is loaded, so
the cache cannot serve the tokens of an older version of the dataset.

Mixing (``data.train_weights``, one per train file, the open-instruct convention): a weight <= 1 takes
that fraction of the file's rows, a whole number > 1 takes that many rows (repeating the file when it
is larger than the file): a row count, not a multiplier, whether written 2 or 2.0 (the config holds
floats). Eval rows are split off each file *before* weighting, so repeated rows never leak into eval.
The rows read and kept per file are logged (``log_mixing``), with a warning where a whole-number weight
keeps fewer rows than the file has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from ..failures import cause
from .errors import DataError, Skipped, unreadable
from .formats import detect, to_conversation
from .toolcalls import STORED

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
KEEP = ("messages", "tools", "_source", "_row")
MESSAGE = {k: datasets.Value("string") for k in STORED}  # one schema for plain and tool-calling rows alike
# "owner/name" or "name" on the Hugging Face Hub, optionally "@revision" (a branch, tag or commit)
HUB_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[\w./-]+))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
log = logging.getLogger(__name__)


def hub_dataset(path: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``path`` names a hub dataset rather than a local file or directory."""
    p = Path(path)
    if p.exists() or p.suffix in BUILDERS:
        return None
    m = HUB_NAME.fullmatch(path)
    return (m["repo"], m["revision"]) if m else None


@lru_cache(maxsize=None)  # once per process: the cache key and the rows loaded name the same commit
def _ask_hub(repo: str, revision: str | None) -> str:
    from huggingface_hub import HfApi

    sha = HfApi().dataset_info(repo, revision=revision, timeout=30).sha
    if not sha:
        raise LookupError("the Hub named no commit")
    return sha


def hub_commit(repo: str, revision: str | None) -> tuple[str | None, str]:
    """(the commit ``revision`` of hub dataset ``repo`` points at (None: its default branch), or None when
    the Hub cannot be asked, e.g. offline; why not, or "")."""
    if revision and COMMIT.fullmatch(revision):
        return revision, ""  # pinned: nothing to ask
    try:
        return _ask_hub(repo, revision), ""
    except Exception as e:  # offline (HF_HUB_OFFLINE), no network, no such repo: the load says which
        return None, f"{type(e).__name__}: {e}"


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
        return "invalid_utf8", (f"{path} line {n}: not valid UTF-8 (byte {e.object[e.start]:#04x} at column "
                                f"{e.start + 1})")
    return "invalid_json", f"{path} line {n}: not valid JSON ({e})"


def read_rows(path: str, policy: str, skipped: Skipped) -> datasets.Dataset | list[dict]:
    """Raw rows of one file (a Dataset), or a list of dicts when only the slow path could read it. Whatever
    ``datasets`` or the system refuses (an I/O error, a file that does not parse, a hub dataset out of reach)
    is a DataError naming the file."""
    p = Path(path)
    try:
        if p.is_dir():
            ds = _saved_dataset(p)
        elif p.suffix in BUILDERS:
            return _read_file(p, policy, skipped)
        elif (hub := hub_dataset(path)) is None:
            raise DataError(f"{path}: {'unsupported file type ' + repr(p.suffix) if p.exists() else 'not found'} "
                            f"(data files are {', '.join(BUILDERS)}; or a directory saved with save_to_disk, or a hub "
                            "dataset name owner/name[@revision])", reason="missing_file")
        else:
            ds = _hub_rows(path, *hub)
    except OSError as e:  # an I/O error, a permission: the system's words and the file
        raise unreadable(path, e) from e
    return ds.add_column("_source", [str(path)] * len(ds)).add_column("_row", list(range(1, len(ds) + 1)))


def _saved_dataset(p: Path) -> datasets.Dataset:
    """A directory written by ``save_to_disk`` (its train split, for a DatasetDict)."""
    if not any((p / f).is_file() for f in ("state.json", "dataset_dict.json")):
        files = sorted(str(f) for f in p.iterdir() if f.suffix in BUILDERS)
        raise DataError(f"{p}: a directory, but not a dataset saved with save_to_disk (no state.json or "
                        f"dataset_dict.json); name data files in data.train_files ({', '.join(BUILDERS)})"
                        + (f": it holds {len(files)}, e.g. {', '.join(files[:3])}" if files else ""),
                        reason="missing_file")
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001  datasets and Arrow raise a zoo of types for a damaged directory
        raise DataError(f"{p}: the saved dataset cannot be read ({cause(e)}): save it again with save_to_disk",
                        reason="unreadable") from e
    return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds


def _read_file(p: Path, policy: str, skipped: Skipped) -> datasets.Dataset | list[dict]:
    path = str(p)
    if not p.is_file():
        raise DataError(f"{path}: file not found (data.train_files / data.val_files)", reason="missing_file")
    lines, utf8 = _jsonl_lines(p) if p.suffix == ".jsonl" else ([], True)
    if not utf8:
        return _read_jsonl_by_hand(p, policy, skipped)  # names the file and line of each bad one
    try:
        ds = datasets.load_dataset(BUILDERS[p.suffix], data_files=path, split="train")
    except Exception as e:  # Arrow names neither line nor field; find them ourselves
        if p.suffix != ".jsonl":
            raise DataError(f"{path}: could not be read as {p.suffix} ({cause(e)}): check that it is a valid "
                            f"{p.suffix} file (or convert it to .jsonl, whose bad lines are named)",
                            reason="unreadable") from e
        return _read_jsonl_by_hand(p, policy, skipped)
    if p.suffix == ".jsonl":
        if len(ds) != len(lines):
            raise DataError(f"{path}: {len(ds)} JSON objects on {len(lines)} non-empty lines, but a .jsonl file "
                            "holds one JSON object per line (this one looks pretty-printed over several lines); "
                            f"rewrite it one object per line, e.g. `jq -c . {path} > fixed.jsonl`",
                            reason="multiline_json")
        return ds.add_column("_source", [path] * len(ds)).add_column("_row", lines)
    return ds.add_column("_source", [path] * len(ds)).add_column("_row", list(range(1, len(ds) + 1)))


def reachable_hub_dataset(path: str, repo: str) -> None:
    """Fail at once, not after a minute of retries, when ``path`` would be a hub dataset and there is no network
    (with HF_HUB_OFFLINE=1, ``datasets`` reads its cache instead)."""
    from ..hub import offline_by_choice, unreachable

    why = unreachable("dataset")
    if why and not offline_by_choice("dataset"):
        raise DataError(f"{path}: no such local file or directory, and the Hub cannot be reached to load it as a hub "
                        f"dataset ({why}): if it is a local path, correct it; a hub dataset already in the datasets "
                        f"cache loads with HF_HUB_OFFLINE=1; else download it where there is a network (`hf download "
                        f"{repo} --repo-type dataset --local-dir <dir>`) and name its files", reason="missing_file")


def _hub_rows(path: str, repo: str, revision: str | None) -> datasets.Dataset:
    """A hub dataset's train split; needs a network (or the datasets cache with HF_HUB_OFFLINE=1)."""
    from ..hub import offline_by_choice

    reachable_hub_dataset(path, repo)
    try:
        return datasets.load_dataset(repo, revision=hub_commit(repo, revision)[0] or revision, split="train")
    except Exception as e:  # noqa: BLE001  no such dataset, offline and not cached, a gated one, a bad revision
        offline = offline_by_choice("dataset")
        raise DataError(f"{path}: not a local file or directory, and it could not be loaded as a hub dataset "
                        f"({cause(e)}{f'; {offline}: only the local cache is read' if offline else ''}): check the "
                        "name (and @revision), log in (`hf auth login`) for a gated one, or download it and name its "
                        "files", reason="missing_file") from e


def _features(raw) -> datasets.Features:
    where = raw.features if isinstance(raw, datasets.Dataset) else {}
    return datasets.Features({"messages": datasets.List(MESSAGE), "tools": datasets.Value("string"),
                              "_error": datasets.Value("string"),
                              "_source": where.get("_source", datasets.Value("string")),
                              "_row": where.get("_row", datasets.Value("int64"))})


def normalise(raw, fmt: str, policy: str, skipped: Skipped, source: str) -> datasets.Dataset:
    """Rows -> Dataset(messages, tools, _source, _row) in the stored form of ``toolcalls.py``; bad rows raise
    (policy error) or are recorded (skip)."""
    columns = raw.column_names if isinstance(raw, datasets.Dataset) else sorted({k for r in raw for k in r})
    fmt = detect(columns, source) if fmt == "auto" else fmt

    def convert(row):
        try:
            return {**to_conversation(row, fmt), "_error": ""}
        except DataError as e:
            if policy == "error":
                raise
            return {"messages": [], "tools": None, "_error": f"{e.reason}\t{e}"}

    features = _features(raw)
    if isinstance(raw, list):
        out = [{**convert(r), "_source": r["_source"], "_row": r["_row"]} for r in raw]
        ds = datasets.Dataset.from_list(out, features=features) if out else datasets.Dataset.from_dict(
            {k: [] for k in features}, features=features)
    else:
        ds = raw.map(convert, remove_columns=[c for c in raw.column_names if c not in KEEP[2:]], features=features,
                     desc="format")
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
        batches = ds.select_columns(["messages", "tools"]).iter(batch_size=1000)
        for start, batch in zip(range(0, len(ds), 1000), batches):
            for i, (msgs, tools) in enumerate(zip(batch["messages"], batch["tools"])):
                key = json.dumps([msgs, tools], sort_keys=True, ensure_ascii=False).encode()
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


def log_mixing(counts: list[dict]) -> None:
    """One info line per train file (rows read -> rows kept), and a warning where a whole-number weight keeps
    fewer rows than the file has (a row count read as a multiplier). ``counts``: per train file, its
    ``file``, ``weight`` (None: no weights), rows ``read``, ``duplicates`` dropped, held out for ``eval``, ``kept``."""
    for i, c in enumerate(counts):
        w, train = c["weight"], c["read"] - c["duplicates"] - c["eval"]
        why = [f"{c['duplicates']:,} duplicates dropped" if c["duplicates"] else "",
               f"{c['eval']:,} held out for eval" if c["eval"] else "",
               f"data.train_weights[{i}]={w:g}" if w is not None else ""]
        log.info("data.train_files[%d] %s: %s rows read -> %s kept%s", i, c["file"], f"{c['read']:,}",
                 f"{c['kept']:,}", f" ({'; '.join(x for x in why if x)})" if any(why) else "")
        if w is not None and w > 1 and w == int(w) and w < train:
            log.warning("data.train_weights[%d]=%g keeps %s of the %s training rows of %s: a whole number > 1 is a "
                        "row count, not a multiplier (2 and 2.0 alike: the config holds floats); a fraction in "
                        "(0, 1] takes that share of the rows, and N copies of the file are N times its row count "
                        "(%s for two)", i, w, f"{int(w):,}", f"{train:,}", c["file"], f"{2 * train:,}")


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
