"""Trainer (collectives): work the main process does alone while the other ranks wait, and work every rank shares.

``main_decides`` runs a block on the main process only and hands every rank its result, or its failure: a rank
waiting in a collective for a main process that raised would otherwise wait for the collective timeout (under
``srun`` nothing kills it sooner; under torchrun the agent does, with a page of tracebacks). The failure reaches
every rank as one error:

    ConfigError (a bad config, a taken lock)   the same ConfigError on every rank
    OSError (disk full, permission, I/O)       TrainingError naming what failed, the room left and what to do:
      (or a library's error around one:        one line, exit code 2
      safetensors, PyTorch's writer)
    anything else (a bug)                      the main process re-raises it (its traceback); the others stop

``cache_builder`` picks the process that builds the token cache: one for the job where every node sees the cache
directory (a shared filesystem), else one per node.

``every_rank_writes`` runs a write that every rank does (``save_state``: each rank its own files) and shares its
outcome: a full disk on any rank stops every rank with the same line.

``share_files`` splits work over files (a checkpoint's CRCs) among the ranks and gathers the results, so
verifying a checkpoint takes 1/N of the time it takes one process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..config import ConfigError
from ..failures import why_write_failed, write_failure
from .guards import TrainingError

T = TypeVar("T")


def main_decides(acc, decide: Callable[[], T], what: str, where: Path | None = None) -> T:
    """``decide()`` on the main process; every rank returns its result or raises its failure (see the module
    docstring). ``what`` names the work in the error ('saving checkpoint step_4'); ``where``, the path it writes
    (whose filesystem's free space a failed write reports; else the path the OS error names)."""
    from accelerate.utils import broadcast_object_list

    box: list = [("ok", None)]
    failure = None
    if acc.is_main_process:
        try:
            box = [("ok", decide())]
        except ConfigError as e:
            box = [("config", str(e))]
        except TrainingError as e:
            box = [("error", f"{what} failed on the main process: {e}")]
        except Exception as e:  # noqa: BLE001  a bug: the main process keeps its traceback, the others must not wait
            if write_failure(e):  # the OS's error, or a library's around it (safetensors, PyTorch's writer)
                box = [("error", f"{what} failed on the main process: {why_write_failed(e, where)}")]
            else:
                failure = e
                box = [("bug", f"{what} failed on the main process ({type(e).__name__}: {e}); see its traceback")]
    if acc.num_processes > 1:
        broadcast_object_list(box)
    kind, value = box[0]
    if kind == "ok":
        return value
    if kind == "config":
        raise ConfigError(value)
    if failure is not None:
        raise failure
    raise TrainingError(value)


def every_rank_writes(acc, write: Callable[[], None], what: str, where: Path) -> None:
    """``write()`` on every rank (each its own files, e.g. ``save_state``); a failed write on any rank (a full disk)
    raises the same one-line TrainingError on every rank, naming the first rank that failed. Collective: the
    gather of the outcomes is also the barrier after the writes."""
    from accelerate.utils import gather_object

    failure = None
    try:
        write()
    except (ConfigError, TrainingError):
        raise
    except Exception as e:
        if not write_failure(e):
            raise
        failure = f"{what} failed on rank {acc.process_index}: {why_write_failed(e, where)}"
    failures = gather_object([failure]) if acc.num_processes > 1 else [failure]
    failed = next((f for f in failures if f), None)
    if failed:
        raise TrainingError(failed)


def share_files(acc, files: list[Path], work: Callable[[Path], T]) -> list[T | BaseException]:
    """``work(f)`` for every file, each rank taking every N-th of them (largest first, so the shares are even); the
    results, in the order of ``files``, on every rank. A file whose work raised an OSError gives that error."""
    from accelerate.utils import gather_object

    order = sorted(range(len(files)), key=lambda i: -_size(files[i]))
    mine = order[acc.process_index::acc.num_processes]
    done = []
    for i in mine:
        try:
            done.append((i, work(files[i])))
        except OSError as e:
            done.append((i, e))
    gathered = gather_object(done) if acc.num_processes > 1 else done  # all_gather: every rank has every pair
    results: list = [None] * len(files)
    for i, result in gathered:
        results[i] = result
    return results


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def cache_builder(acc, cache: Path) -> bool:
    """Whether this process builds the token cache in ``cache`` (collective). On one node, or where every node sees
    the same directory (a shared filesystem: the main process leaves a probe file that every node's first process
    looks for), the main process alone: one build for the job. Otherwise (node-local caches) the first process of
    each node."""
    import logging
    import os
    import uuid

    from accelerate.utils import gather_object

    if acc.num_processes == int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)):
        return acc.is_main_process
    probe = cache / f".distsft-probe-{uuid.uuid4().hex}"  # each rank its own name: only the main's is written

    def leave():
        cache.mkdir(parents=True, exist_ok=True)
        probe.touch()
        return probe.name

    name = main_decides(acc, leave, f"writing a probe file into the token cache directory {cache}")
    sees = gather_object([not acc.is_local_main_process or (cache / name).exists()])
    main_decides(acc, lambda: (cache / name).unlink(missing_ok=True), f"removing {cache / name}")
    shared = all(sees)
    logging.getLogger("distsft").info(
        "token cache %s: %s", cache, "every node sees it (a shared filesystem): prepared once, by the main process"
        if shared else "node-local: the first process of each node prepares its own copy")
    return acc.is_main_process if shared else acc.is_local_main_process
