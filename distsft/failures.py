"""Third-party failures in one line: what a library raised while reading or writing, said so that a user can act.

The libraries wrap the operating system's error in their own, or drop it::

    safetensors   SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)
    PyTorch       RuntimeError: [enforce fail at inline_container.cc] PytorchStreamWriter failed writing file ...
    numpy         OSError: 7123 requested and 4032 written                     (a full disk, without an errno)
    datasets      DatasetGenerationError: An error occurred while generating the dataset   (the parser's error
                  is its __cause__)

``write_failure`` recognises a failed write under any of them; ``why_write_failed`` says it in one line with the
room left on that filesystem and what to do; ``cause`` is the innermost error of a chain, on one line.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)
ADVICE = {
    errno.ENOSPC: "free space there, or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space there, or write elsewhere",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.EACCES: "no permission to write there: fix its permissions, or write elsewhere",
    errno.EPERM: "no permission to write there: fix its permissions, or write elsewhere",
    errno.EIO: "the disk (or network filesystem) reported an I/O error: check it, or write elsewhere",
    errno.ENOTDIR: "a file stands where a directory must be: move it, or write elsewhere",
    errno.EEXIST: "a file stands where a directory must be: move it, or write elsewhere",
}
OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust (safetensors) quotes an errno


def chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the errors under it (``__cause__``, else ``__context__``), outermost first; without the text of a
    worker process's traceback that multiprocessing hangs under the error it re-raises (``RemoteTraceback``)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ != "RemoteTraceback":
            yield e
        e = e.__cause__ or e.__context__


def cause(e: BaseException, limit: int = 300) -> str:
    """'Type: message' of the innermost error under ``e`` with a message, on one line and at most ``limit``
    characters: a wrapper (``DatasetGenerationError``) says less than what it wraps."""
    inner = [x for x in chain(e) if str(x).strip()] or [e]
    x = inner[-1]
    text = " ".join(str(x).split())
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(x).__name__}: {text}" if text else type(x).__name__


def write_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed write (or read) of a file, as any of the libraries raise it."""
    for x in chain(e):
        text = str(x)
        if isinstance(x, OSError):
            return True
        if type(x).__name__ == "SafetensorError" and ("I/O error" in text or "os error" in text):
            return True
        if isinstance(x, RuntimeError) and ("PytorchStreamWriter" in text or "file write failed" in text):
            return True
    return False


def _errno(e: BaseException) -> tuple[int | None, str | None]:
    """(errno, the file it names) of the OS error under ``e``, where one can be found."""
    for x in chain(e):
        if isinstance(x, OSError) and x.errno:
            return x.errno, x.filename
        if m := OS_ERROR_IN_TEXT.search(str(x)):
            return int(m.group(1)), None
    return None, None


def _said(e: BaseException, code: int | None) -> str:
    """What the system said: its words for the errno, else the first OS error's message (numpy's '7123 requested
    and 4032 written'), else the innermost error's."""
    if code:
        return os.strerror(code)
    os_error = next((x for x in chain(e) if isinstance(x, OSError) and str(x)), None)
    return " ".join(str(os_error).split()) if os_error is not None else cause(e)


def free_bytes(path: Path | str | None) -> int | None:
    """Bytes free on the filesystem of ``path`` (or of its nearest existing parent); None if unknown."""
    if path is None:
        return None
    p = Path(path)
    for q in (p, *p.parents):
        try:
            return shutil.disk_usage(q).free
        except OSError:
            continue
    return None


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def why_write_failed(e: BaseException, where: Path | str | None = None) -> str:
    """One line: what the system said, the file, the room left on that filesystem, and what to do.
    ``where``: the file or directory being written (else the one the OS error names)."""
    code, filename = _errno(e)
    free = free_bytes(filename or where)  # the file the OS names is where the room ran out
    full = code in FULL or (code is None and free is not None and free < (1 << 20))
    said = _said(e, code)
    room = f"{size(free)} free on that filesystem" if free is not None and (full or code is None) else None
    details = [str(x) for x in (filename or where, room) if x]
    advice = ADVICE[errno.ENOSPC] if full else ADVICE.get(code, "check that path, or write elsewhere")
    note = f" ({'; '.join(details)})" if details else ""
    return f"{said}{note}: {advice}"
