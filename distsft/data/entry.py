"""Data (token cache entry): the life of one entry on disk, shared by the processes that read it.

An entry (data.prepare) is complete when its ``index.json`` is there and every file it names has the size it
records (``intact``); a damaged one is removed and rebuilt, never trusted. A failed build leaves a ``.failed``
marker beside the entry, naming the process and the error, so that the node's other processes, which wait for the
first one to build it (``wait_for``, at most data.prepare_timeout seconds), stop with that error instead of their
timeout. A write that fails (a full or read-only disk, whatever library raised it) becomes one line naming the entry
and the room left (``writing``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from ..config import ConfigError
from ..failures import why_write_failed, write_failure
from . import cachekey
from .sources import DataError

log = logging.getLogger("distsft.data.prepare")


def intact(directory: Path, index: dict) -> str | None:
    """None when every file the index names has its recorded size, else what is wrong."""
    for split in index["splits"].values():
        files = [f for s in split["shards"] for f in s["files"].values()] + list(split["pack"]["files"].values())
        for f in files:
            p = directory / f["file"]
            if not p.is_file() or p.stat().st_size != f["bytes"]:
                return f"{p} is missing or has another size than its index records ({f['bytes']} bytes)"
    return None


def read_entry(path: Path) -> dict | None:
    """The index of a complete, intact entry at ``path``, else None (a damaged one is moved aside)."""
    try:
        index = json.loads((path / "index.json").read_text())
    except (OSError, ValueError):
        return None
    problem = intact(path, index) if index.get("version") == cachekey.CACHE_VERSION else "another cache version"
    if problem is None:
        return index
    log.warning("token cache entry %s is damaged (%s): rebuilding it", path, problem)
    shutil.rmtree(path, ignore_errors=True)
    return None


def failed_marker(path: Path) -> Path:
    return path.with_name(f"{path.name}.failed")


@contextmanager
def writing(path: Path, hint: str):
    """A write of the tokenized data that fails (a full disk, a read-only or failing one, whatever library raised
    it) becomes a DataError naming ``path``, the room left and what to do; bad data passes as it is."""
    try:
        yield
    except Exception as e:
        if isinstance(e, (DataError, ConfigError)) or not write_failure(e):
            raise
        raise DataError(f"writing the tokenized data into {path} failed: {why_write_failed(e, path)} ({hint})",
                        reason="cache_write") from e


def wait_for(path: Path, timeout: float, poll: float = 0.5) -> dict:
    """The index of the entry at ``path`` once this node's first process has built it."""
    start, since = time.monotonic(), time.time() - 5  # a failure marker older than this is an earlier run's
    while True:
        index = read_entry(path) if (path / "index.json").exists() else None
        if index is not None:
            return index
        marker = failed_marker(path)
        if marker.exists() and marker.stat().st_mtime >= since:
            raise DataError(f"the first process of this node failed to prepare the data "
                            f"({marker.read_text().strip()})", reason="prepare_failed")
        if time.monotonic() - start > timeout:
            raise DataError(
                f"waited data.prepare_timeout={timeout:g} s for the token cache entry {path}, which the first "
                "process of this node builds, and it did not appear: that process is slow (raise "
                "data.prepare_timeout, or build the cache ahead of time with `python -m distsft.prepare` and "
                "the same overrides) or it died (see its log)", reason="prepare_timeout")
        time.sleep(poll)
