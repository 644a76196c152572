"""distsft/failures.py: a failed write is recognised under whichever library raised it and said in one line, with
the room left and what to do."""

from __future__ import annotations

import errno
import os

from distsft.failures import cause, why_write_failed, write_failure


class SafetensorError(Exception):
    """Named as safetensors' own error type is (its class lives in a Rust extension)."""


class RemoteTraceback(Exception):
    """Named as multiprocessing's text of a worker's traceback is."""


def wrapped(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


def test_a_full_disk_under_every_library(tmp_path):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.npy"))
    cases = [full,
             SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
             wrapped(RuntimeError("Parent directory does not exist"), full),  # torch around an OS error
             wrapped(OSError("7123 requested and 4032 written"), RemoteTraceback('"""\nTraceback (most recent...'))]
    for e in cases:
        assert write_failure(e), e
        line = why_write_failed(e, tmp_path)
        assert "\n" not in line and "Traceback" not in line and str(tmp_path) in line, line
    assert why_write_failed(cases[1], tmp_path).startswith("No space left on device (")
    assert why_write_failed(cases[3], tmp_path).startswith("7123 requested and 4032 written (")
    assert write_failure(RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                                      "writing file data/0: file write failed"))
    assert not write_failure(ValueError("a bug")) and not write_failure(SafetensorError("header too large"))


def test_the_advice_follows_the_errno(tmp_path):
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "f"))
    assert why_write_failed(read_only) == f"Read-only file system ({tmp_path / 'f'}): the filesystem is read-only: " \
                                          "write elsewhere"
    not_a_dir = OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(tmp_path / "f" / "g"))
    assert "a file stands where a directory must be" in why_write_failed(not_a_dir)


def test_cause_is_the_innermost_error_on_one_line():
    e = wrapped(RuntimeError("An error occurred while generating the dataset"),
                ValueError("Expected object or value\n  at position 14"))
    assert cause(e) == "ValueError: Expected object or value at position 14"
    assert cause(ValueError("x" * 400)).endswith("...") and len(cause(ValueError("x" * 400))) < 320
