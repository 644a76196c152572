"""Data (format), tool calls and reasoning: the extra fields of a tool-calling conversation, checked
and brought to one stored form whatever the row's spelling (``formats.py`` calls this for every turn).

OpenAI / Hugging Face messages::

    {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}],
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": null, "reasoning_content": "I need the weather.",
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
                  {"role": "assistant", "content": "It is 22 C in Paris."}]}

Also read: a legacy ``function_call`` {"name", "arguments"} and role ``function`` (or ``ipython``) for its result;
``thinking`` or ``reasoning`` for ``reasoning_content``; arguments as a JSON string or an object (or under
``parameters``); ``tools`` (or ``functions``) as a JSON string, and bare function schemas {"name", ...} in it,
wrapped as {"type": "function", "function": ...}. ShareGPT (LLaMA-Factory): {"from": "function_call", "value":
"{\\"name\\": ..., \\"arguments\\": ...}"} (a JSON list of them: parallel calls), {"from": "observation", "value":
...} (also ``tool_call``, ``tool``, ``function``, ``ipython``, ``tool_response``), ``tools`` and ``system`` columns.

Stored form, one Arrow schema for every row (``None`` where a field does not apply): ``role``
(system|user|assistant|tool), ``content`` ("" for a turn that only calls tools), ``reasoning_content``,
``tool_calls`` (a JSON string of [{"id"?, "type": "function", "function": {"name", "arguments": {...}}}]),
``tool_call_id`` and ``name`` (of a tool result, filled from the call it answers). The row's ``tools`` are a
JSON string of [{"type": "function", "function": {...}}], or None.

Checked, naming file, row and field: every call has a name; its arguments are JSON (an object); every tool
result answers an earlier call not answered yet, by ``tool_call_id`` when it and the open calls carry ids, else
the first open call (order). ``null`` values inside object-valued arguments and tool schemas are dropped: the
Arrow reader fills a key that one row has and another lacks with null.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import bad

REASONING = ("reasoning_content", "thinking", "reasoning")  # spellings of an assistant turn's reasoning
STORED = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")
RESULT_ROLES = {"tool": "tool", "function": "tool", "ipython": "tool"}  # messages: a tool's result
SHAREGPT_TOOL_ROLES = {"function_call": "call", "tool_call": "call", "observation": "tool", "tool": "tool",
                       "function": "tool", "ipython": "tool", "tool_response": "tool"}


def _no_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_nulls(v) for v in value]
    return value


def _json(row: dict, value: str, field: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as e:
        raise bad(row, "invalid_json", f"field '{field}' is not valid JSON ({e})") from None


def tools_of(row: dict) -> list[dict] | None:
    """The row's tool schemas (``tools``, or legacy ``functions``), each as {"type": "function", "function": ...}."""
    key = "tools" if row.get("tools") is not None else "functions"
    value = row.get(key)
    if isinstance(value, str):
        value = _json(row, value, key) if value.strip() else None
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad(row, "not_list", f"field '{key}' must be a list of tool schemas, got {type(value).__name__}")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise bad(row, "not_object", f"field '{key}[{i}]' must be an object, got {type(tool).__name__}")
        tool = _no_nulls(tool)
        wrapped = isinstance(tool.get("function"), dict)
        fn = tool["function"] if wrapped else tool
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(row, "missing_field", f"field '{key}[{i}]{'.function' if wrapped else ''}.name' is missing")
        out.append(tool if wrapped else {"type": "function", "function": tool})
    return out or None


def _call(row: dict, call: Any, field: str) -> dict:
    if not isinstance(call, dict):
        raise bad(row, "not_object", f"field '{field}' must be an object, got {type(call).__name__}")
    fn, f = (call["function"], f"{field}.function") if isinstance(call.get("function"), dict) else (call, field)
    name = fn.get("name")
    if name is None or name == "":
        raise bad(row, "missing_field", f"field '{f}.name' is missing")
    if not isinstance(name, str) or not name.strip():
        raise bad(row, "not_string", f"field '{f}.name' must be a non-empty string, got {name!r}")
    key = "parameters" if "parameters" in fn and "arguments" not in fn else "arguments"
    args = fn.get(key)
    args = {} if args is None else _json(row, args, f"{f}.{key}") if isinstance(args, str) else _no_nulls(args)
    if not isinstance(args, dict):
        raise bad(row, "not_object", f"field '{f}.{key}' must be a JSON object, got {type(args).__name__}")
    out = {"id": str(call["id"])} if call.get("id") is not None else {}
    return {**out, "type": "function", "function": {"name": name, "arguments": args}}


def calls_of(row: dict, value: Any, field: str) -> list[dict]:
    """A list of calls (``tool_calls``, ShareGPT parallel calls) or one call (``function_call``) -> stored calls."""
    if isinstance(value, dict):
        return [_call(row, value, field)]
    if not isinstance(value, list) or not value:
        raise bad(row, "not_list", f"field '{field}' must be a non-empty list of tool calls")
    return [_call(row, c, f"{field}[{j}]") for j, c in enumerate(value)]


def _content(row: dict, turn: dict, field: str, role: str, key: str) -> str:
    value = turn.get(key)
    if value is None:
        if role == "assistant" and (turn.get("tool_calls") or turn.get("function_call")):
            return ""  # a turn that only calls tools
        raise bad(row, "missing_field", f"field '{field}.{key}' is missing")
    if role == "tool" and isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)  # a structured result, as the tool would print it
    if not isinstance(value, str):
        raise bad(row, "not_string", f"field '{field}.{key}' must be a string, got {type(value).__name__}")
    return value


def _assistant(row: dict, turn: dict, field: str) -> dict:
    out: dict[str, Any] = {}
    key = "tool_calls" if turn.get("tool_calls") is not None or turn.get("function_call") is None else "function_call"
    if turn.get(key):  # [] on a turn without calls is common
        out["tool_calls"] = calls_of(row, turn[key], f"{field}.{key}")
    for k in REASONING:
        if turn.get(k) is not None:
            if not isinstance(turn[k], str):
                raise bad(row, "not_string", f"field '{field}.{k}' must be a string, got {type(turn[k]).__name__}")
            if turn[k].strip():
                out["reasoning_content"] = turn[k]
            break
    return out


def _ids(row: dict, turn: dict, field: str) -> dict:
    out = {}
    for k in ("tool_call_id", "name"):
        if turn.get(k) is not None:
            if not isinstance(turn[k], (str, int)):
                raise bad(row, "not_string", f"field '{field}.{k}' must be a string, got {type(turn[k]).__name__}")
            out[k] = str(turn[k])
    return out


def message(row: dict, turn: dict, field: str, role: str, content_key: str) -> dict:
    """One turn (``role`` already mapped: system|user|assistant|tool, or call: a ShareGPT function_call) -> message."""
    if role == "call":
        value = turn.get(content_key)
        if value is None:
            raise bad(row, "missing_field", f"field '{field}.{content_key}' is missing")
        calls = _json(row, value, f"{field}.{content_key}") if isinstance(value, str) else value
        return {"role": "assistant", "content": "", "tool_calls": calls_of(row, calls, f"{field}.{content_key}")}
    msg = {"role": role, "content": _content(row, turn, field, role, content_key)}
    if role == "assistant":
        msg.update(_assistant(row, turn, field))
    elif role == "tool":
        msg.update(_ids(row, turn, field))
    elif turn.get("tool_calls") or turn.get("function_call"):
        raise bad(row, "tool_call_role", f"field '{field}' calls tools as {role!r}: only assistant turns call tools")
    return msg


def match_results(row: dict, msgs: list[dict], fields: list[str]) -> list[dict]:
    """Check that every tool result answers an earlier open call (by id when both carry ids, else by order)
    and give it the call's name and id when it has none; ``fields[i]`` names message i in errors."""
    open_calls: list[dict] = []
    for m, field in zip(msgs, fields):
        if m["role"] == "assistant":
            open_calls += m.get("tool_calls", [])
        elif m["role"] == "tool":
            cid = m.get("tool_call_id")
            by_id = cid is not None and any("id" in c for c in open_calls)
            call = next((c for c in open_calls if c.get("id") == cid), None) if by_id else \
                (open_calls[0] if open_calls else None)
            if call is None:
                raise bad(row, "unmatched_tool_result",
                          f"field '{field}.tool_call_id' is {cid!r}, which no earlier tool call awaiting a result has"
                          if by_id else f"field '{field}' is a tool result without an earlier tool call to answer")
            open_calls.remove(call)
            m.setdefault("name", call["function"]["name"])
            if "id" in call:
                m.setdefault("tool_call_id", call["id"])
    return msgs


def stored(msgs: list[dict]) -> list[dict]:
    """Messages in the stored form: every field of ``STORED``, tool calls as a JSON string."""
    return [{k: json.dumps(m[k], ensure_ascii=False) if k == "tool_calls" and m.get(k) is not None else m.get(k)
             for k in STORED} for m in msgs]
