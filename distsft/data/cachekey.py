"""Data (cache key): what makes a token cache entry, so that the same key always means the same tokens.

The key hashes the data files' content (a hub dataset: the commit its revision points at), the tokenizer, the chat
template, every data option that changes tokens, and the versions of the code that renders and tokenizes
(``token_versions``: this cache format, distsft, transformers, tokenizers, jinja2). ``prepare.py`` builds or maps
the entry under ``cache_root(cfg) / key``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..config import DataConfig
from .errors import unreadable
from .sources import hub_commit, hub_dataset, reachable_hub_dataset

log = logging.getLogger("distsft.data.prepare")
CACHE_VERSION = 4  # the format of an entry (3: the index records the rows per train file and the versions;
#                    4: rows carry tool calls and reasoning, which earlier entries rendered without)
SHAPES_TOKENS = ("distsft", "transformers", "tokenizers", "jinja2")  # packages whose versions are in the key


def _digest_file(path: Path, h) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


NOT_IN_KEY = ("num_workers", "num_proc", "shard_size", "prepare_timeout", "cache_dir", "mode")


def token_versions() -> dict[str, str]:
    """The cache format and the versions of the packages that render and tokenize: another version of any of
    them may give other tokens for the same rows, so each is part of the cache key."""
    out = {"cache_format": str(CACHE_VERSION)}
    for pkg in SHAPES_TOKENS:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # distsft run from a checkout that is not installed
            out[pkg] = "not installed"
    return out


def _hub_key(path: str, repo: str, revision: str | None) -> str:
    commit, why_not = hub_commit(repo, revision)
    if commit is None:
        log.warning("hub dataset %s: could not ask the Hub which commit %s is (%s), so the token cache keys it by "
                    "name and revision only and may serve the tokens of an older version of it; pin a commit "
                    "(%s@<commit>) for a key that cannot go stale", path, revision or "its default branch",
                    why_not, repo)
        return json.dumps({"hub": repo, "revision": revision, "commit": None})
    return json.dumps({"hub": repo, "commit": commit})


def cache_key(cfg: DataConfig, tokenizer, template: str) -> str:
    h = hashlib.sha256()
    opts = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY}
    h.update(json.dumps({"v": token_versions(), "cfg": opts, "template": template,
                         "special": tokenizer.special_tokens_map}, sort_keys=True, default=str).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer")
             else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for f in [*cfg.train_files, *cfg.val_files]:
        if (hub := hub_dataset(f)) is not None:
            reachable_hub_dataset(f, hub[0])  # no network: fail now, not after a minute of retries
            h.update(_hub_key(f, *hub).encode())
            continue
        p = Path(f)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p] if p.is_file() else []
        h.update(f.encode())
        for x in files:
            try:
                _digest_file(x, h)
            except OSError as e:  # an I/O error, a permission: named here, where the file is first read
                raise unreadable(x, e) from e
    return h.hexdigest()[:24]


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("DISTSFT_CACHE", Path.home() / ".cache" / "distsft")) / "tokenized"
