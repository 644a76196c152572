"""Data (format): normalise every supported row format to chat ``messages``.

    messages:               {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
                             "tools": [tool schema, ...] (optional)}
    sharegpt:               {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
                             "system": str (optional), "tools": JSON string (optional)}
    alpaca:                 {"instruction": str, "input": str (optional), "output": str}
                            -> [user: instruction (+ "\\n\\n" + input), assistant: output]
    prompt_completion:      {"prompt": str | messages, "completion": str | messages}
    instruction_completion: {"instruction": str, "completion" | "response": str, "context" | "input": optional}

Tool calls (``tool_calls``, ``tool`` turns, ShareGPT ``function_call``/``observation``) and reasoning
(``reasoning_content``) are read by ``toolcalls.py``, which says what every stored message holds.

The format is detected per source from its columns (``data.format=auto``) or forced. A bad row
raises :class:`DataError` naming file, row and field, with a ``reason`` used to count skipped rows.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from .errors import DataError, bad
from .toolcalls import (
    RESULT_ROLES,
    SHAREGPT_TOOL_ROLES,
    match_results,
    message,
    stored,
    tools_of,
)

ROLES = ("system", "user", "assistant")
MESSAGE_ROLES = {**{r: r for r in ROLES}, **RESULT_ROLES}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  **SHAREGPT_TOOL_ROLES}


def _text(row: dict, key: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if optional:
            return ""
        raise bad(row, "missing_field", f"field '{key}' is missing")
    if not isinstance(value, str):
        raise bad(row, "not_string", f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _turns(row: dict, field: str, role_key: str, content_key: str,
           roles: dict[str, str]) -> tuple[list[dict], list[str]]:
    """(messages, the field that names each one in errors)."""
    turns = row.get(field)
    if turns is None:
        raise bad(row, "missing_field", f"field '{field}' is missing")
    if not isinstance(turns, list) or not turns:
        raise bad(row, "empty_conversation", f"field '{field}' must be a non-empty list of turns")
    out, fields = [], []
    for i, t in enumerate(turns):
        f = f"{field}[{i}]"
        if not isinstance(t, dict):
            raise bad(row, "not_string", f"field '{f}' must be an object, got {type(t).__name__}")
        role = t.get(role_key)
        if role not in roles:
            raise bad(row, "unknown_role", f"field '{f}.{role_key}' is {role!r}, expected one of {tuple(roles)}")
        out.append(message(row, t, f, roles[role], content_key))
        fields.append(f)
    return out, fields


def _check_assistant(row: dict, msgs: list[dict[str, str]], field: str) -> list[dict[str, str]]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise bad(row, "no_assistant", f"field '{field}' has no assistant turn (nothing to learn)")
    return msgs


def from_messages(row: dict) -> list[dict[str, str]]:
    msgs = match_results(row, *_turns(row, "messages", "role", "content", MESSAGE_ROLES))
    return _check_assistant(row, msgs, "messages")


def from_sharegpt(row: dict) -> list[dict[str, str]]:
    msgs = match_results(row, *_turns(row, "conversations", "from", "value", SHAREGPT_ROLES))
    system = row.get("system")  # LLaMA-Factory's column for the system prompt
    if isinstance(system, str) and system.strip() and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return _check_assistant(row, msgs, "conversations")


def from_alpaca(row: dict) -> list[dict[str, str]]:
    instruction, extra = _text(row, "instruction"), _text(row, "input", optional=True)
    prompt = instruction + ("\n\n" + extra if extra else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]


def _side(row: dict, key: str, role: str) -> tuple[list[dict], list[str]]:
    value = row.get(key)
    if isinstance(value, list):  # conversational prompt/completion (TRL style)
        return _turns(row, key, "role", "content", MESSAGE_ROLES)
    return [{"role": role, "content": _text(row, key)}], [key]


def from_prompt_completion(row: dict) -> list[dict[str, str]]:
    (prompt, p_fields), (completion, c_fields) = _side(row, "prompt", "user"), _side(row, "completion", "assistant")
    msgs = match_results(row, prompt + completion, p_fields + c_fields)
    return _check_assistant(row, msgs, "completion")


def from_instruction_completion(row: dict) -> list[dict[str, str]]:
    key = "completion" if row.get("completion") is not None or "response" not in row else "response"
    extra = _text(row, "context" if row.get("context") is not None else "input", optional=True)
    prompt = _text(row, "instruction") + ("\n\n" + extra if extra else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, key)}]


FORMATS: dict[str, Callable[[dict], list[dict[str, str]]]] = {
    "messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion, "instruction_completion": from_instruction_completion,
}


def detect(columns: list[str], source: str = "") -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "instruction" in cols and cols & {"completion", "response"}:
        return "instruction_completion"
    raise DataError(f"{source}: cannot detect the data format from columns {sorted(cols - {'_source', '_row'})}: "
                    "expected messages, conversations (sharegpt), instruction+output (alpaca), prompt+completion "
                    "or instruction+completion/response; or set data.format", reason="unknown_format")


def to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    return FORMATS[fmt](row)


def to_conversation(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A raw row -> its stored form: {"messages": stored messages, "tools": JSON string or None}."""
    msgs = to_messages(row, fmt)
    tools = tools_of(row) if fmt in ("messages", "sharegpt", "prompt_completion") else None
    return {"messages": stored(msgs), "tools": json.dumps(tools, ensure_ascii=False) if tools else None}
