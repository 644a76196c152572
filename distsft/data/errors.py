"""Data (errors): what a bad row is called and how skipped rows are counted, shared by every data
stage (sources, formats, tokenize, prepare) without any of them importing another for it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data; the message names the file, row and field; ``reason`` is its kind."""

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason when a worker process sends the error back
        return type(self), (str(self), self.reason)


class TemplateError(DataError):
    """A chat template whose rendering does not allow an unambiguous assistant mask."""


@dataclass
class Skipped:
    """Rows left out under ``data.bad_rows=skip`` (and why); written to the run dir's report."""

    rows: list[dict] = field(default_factory=list)

    def add(self, source: str, row: int, reason: str, message: str) -> None:
        self.rows.append({"file": source, "row": row, "reason": reason, "message": message})

    def counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rows))


def unreadable(path, e: OSError) -> DataError:
    """A DataError for a data file the system cannot read (an I/O error, a permission), in its words."""
    where = f" at {e.filename}" if e.filename and str(e.filename) != str(path) else ""
    return DataError(f"{path}: cannot be read ({e.strerror or e}{where}): check the file and its disk, or leave it "
                     "out of data.train_files / data.val_files", reason="unreadable")


def where(row: dict) -> str:
    """'file row N' of a raw row (read by data stage 1 with its ``_source`` and ``_row``)."""
    return f"{row.get('_source', '?')} row {row.get('_row', '?')}"


def bad(row: dict, reason: str, msg: str) -> DataError:
    """A DataError for a bad field of ``row``, its message prefixed with the file and row."""
    return DataError(f"{where(row)}: {msg}", reason=reason)
