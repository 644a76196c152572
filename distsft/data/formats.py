"""Data stage 2 (format): normalise every supported row format to chat ``messages``.

    messages: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    alpaca:   {"instruction": str, "input": str (optional), "output": str}
              -> [user: instruction (+ "\\n\\n" + input), assistant: output]

A bad row raises :class:`DataError` naming file, row and field.
"""

from __future__ import annotations

from typing import Any

from .sources import DataError

ROLES = ("system", "user", "assistant")


def detect(columns: list[str]) -> str:
    if "messages" in columns:
        return "messages"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    raise DataError(f"cannot detect the data format from columns {sorted(columns)}: expected "
                    "'messages' or 'instruction'+'output' (or set data.format)")


def _where(row: dict) -> str:
    return f"{row.get('_source', '?')} row {row.get('_row', '?')}"


def _text(row: dict, key: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{_where(row)}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def from_messages(row: dict) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{_where(row)}: field 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise DataError(f"{_where(row)}: field 'messages[{i}].role' is {role!r}, expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{_where(row)}: field 'messages[{i}].content' must be a string, "
                            f"got {type(m.get('content')).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{_where(row)}: field 'messages' has no assistant turn (nothing to learn)")
    return out


def from_alpaca(row: dict) -> list[dict[str, str]]:
    instruction, extra = _text(row, "instruction"), _text(row, "input", optional=True)
    prompt = instruction + ("\n\n" + extra if extra else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]


FORMATS = {"messages": from_messages, "alpaca": from_alpaca}


def to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    return FORMATS[fmt](row)
