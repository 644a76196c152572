"""Data (tokenize + mask), what the template sees: a stored conversation (``toolcalls.py``) turned
into the messages and tools a chat template reads, and the reasoning spans that
``data.train_on_reasoning=false`` takes out of the supervised turns.

- Empty fields are left out (a template tests ``'tool_calls' in message``), tool calls and tools are decoded.
- Reasoning is given to a template the way it reads it. ``reasoning_mode`` renders a probe once per template:
  a template that renders ``reasoning_content`` (Qwen3) or ``thinking`` gets both keys (as
  ``apply_chat_template`` aliases them); one that renders neither (Llama 3.1, Qwen2.5, Mistral, the built-ins)
  gets it written into the reply, as DeepSeek-R1 and Qwen3 write it::

      content = "<think>\\n" + reasoning.strip() + "\\n</think>\\n\\n" + content

  Refusing would leave reasoning data unusable with those families, and dropping it would lose it silently;
  the ``<think>`` block is the convention their reasoning fine-tunes (DeepSeek-R1-Distill-Llama) use, and what
  Qwen3's own template and the ``qwen3`` built-in read back out of a reply. ``prepare`` warns when it happens.
  A template that renders only the calls of a calling turn (Llama 3.1, Mistral) drops that block too: such a
  turn is refused (``unwritten``), not trained without its reasoning.
- ``reasoning_spans``: with ``data.train_on_reasoning=false`` the reasoning text of each supervised turn, where
  the rendering shows it, is cut out of the turn's span; the ``<think>`` tags and the reply stay supervised::

      <|im_start|>assistant\\n[[<think>\\n]]Add them.[[\\n</think>\\n\\n2 plus 2 is 4.<|im_end|>]]
"""

from __future__ import annotations

import json
from typing import Any

PROBE = "\ue010reasoning probe\ue011"
_MODES: dict = {}  # (tokenizer id, template) -> "field" | "content"


def reasoning_of(m: dict) -> str:
    """An assistant message's reasoning: its field, else the <think> block written in its reply."""
    if m.get("reasoning_content"):
        return m["reasoning_content"]
    content = m.get("content") or ""
    return content.split("</think>")[0].split("<think>")[-1].strip() if "</think>" in content else ""


def tools_view(tools: Any) -> list[dict] | None:
    """A row's stored tools (a JSON string) -> the list a template reads, None when there are none."""
    if isinstance(tools, str):
        tools = json.loads(tools)
    return tools or None


def view(msgs: list[dict], mode: str = "field") -> list[dict]:
    """Stored (or plain) messages -> the messages a template reads; ``mode`` from ``reasoning_mode``."""
    out = []
    for m in msgs:
        d = {k: v for k, v in m.items() if v is not None}
        reasoning = next((d.pop(k) for k in ("reasoning_content", "thinking", "reasoning") if k in d), None)
        out.append(_assistant(d, reasoning, mode) if d["role"] == "assistant" else d)
    return out


def _assistant(d: dict, reasoning: str | None, mode: str) -> dict:
    d.setdefault("content", "")  # a turn that only calls tools: templates test and split its content
    calls = json.loads(d["tool_calls"]) if isinstance(d.get("tool_calls"), str) else d.get("tool_calls")
    if calls:  # templates write arguments with tojson: an object, as the stored form has it
        d["tool_calls"] = [_decoded(c) for c in calls]
    else:  # no calls: no key (Llama 3.1 tests 'tool_calls' in message)
        d.pop("tool_calls", None)
    if reasoning and mode == "field":
        return {**d, "reasoning_content": reasoning, "thinking": reasoning}
    if reasoning:
        d["content"] = f"<think>\n{reasoning.strip()}\n</think>\n\n{d['content']}"
    return d


def _decoded(call: dict) -> dict:
    """A call whose arguments are a JSON string (messages given to ``encode_conversations`` directly, not read
    by ``toolcalls.py``) with them decoded."""
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            return {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
        except ValueError:
            return call
    return call


def has_reasoning_field(msgs: list[dict]) -> bool:
    return any(m.get(k) for m in msgs for k in ("reasoning_content", "thinking", "reasoning"))


def reasoning_mode(render, key: tuple) -> str:
    """"field" when the template renders a reasoning field, else "content" (written into the reply);
    ``render(messages)`` renders one conversation; decided once per ``key`` (tokenizer, template)."""
    if key not in _MODES:
        probe = [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": "a", "reasoning_content": PROBE, "thinking": PROBE}]
        try:
            _MODES[key] = "field" if PROBE in render(probe) else "content"
        except Exception:  # noqa: BLE001 (a template that refuses the probe: write it where every template shows it)
            _MODES[key] = "content"
    return _MODES[key]


def written_warning(turns: int, mode: str, template_name: str) -> str | None:
    """The warning for ``turns`` reasoning fields written into replies (mode "content"), or None."""
    if not turns or mode != "content":
        return None
    return (f"{template_name} does not render reasoning_content: the reasoning of {turns:,} assistant turns is written "
            "into the reply as <think>\\n...\\n</think>\\n\\n before its text (docs/data.md, reasoning traces)")


def call_names(m: dict) -> list[str]:
    return [c["function"]["name"] for c in m.get("tool_calls") or []]


def reply_text(m: dict) -> str:
    """Everything an assistant message says: its reply and its calls (names and arguments) as JSON."""
    calls = [json.dumps(c["function"], ensure_ascii=False) for c in m.get("tool_calls") or []]
    return "\n".join([m.get("content") or "", *calls])


def missing(m: dict, text: str) -> str | None:
    """What of assistant message ``m`` its rendered span ``text`` lacks: a call ("tool call 'name'"), the
    reply ("text"), or None when all is there. The reply is checked without its reasoning."""
    for name in call_names(m):
        if name not in text:
            return f"tool call {name!r}"
    reply = (m.get("content") or "").split("</think>")[-1].strip()
    return "text" if reply not in text else None


def unwritten(full: str, msgs: list[dict], spans: dict[int, tuple[int, int]]) -> int | None:
    """The first turn that calls tools whose reasoning, written into its reply (mode "content"), the template
    left out (Llama 3.1 and Mistral render a calling turn's calls only), or None."""
    for i, (s, e) in sorted(spans.items()):
        r = reasoning_of(msgs[i]) if msgs[i].get("tool_calls") else ""
        if r and full.find(r, s, e) < 0:
            return i
    return None


def reasoning_spans(full: str, msgs: list[dict], turns: list[int],
                    spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` (of assistant ``turns``, in order) with the reasoning text of each turn cut out, where the
    rendering shows it inside the span (a template may drop an earlier turn's reasoning)."""
    out = []
    for i, (s, e) in zip(turns, spans):
        r = reasoning_of(msgs[i])
        at = full.find(r, s, e) if r else -1
        if at < 0:
            out.append((s, e))
            continue
        out += [p for p in ((s, at), (at + len(r), e)) if p[1] > p[0]]
    return out


TOOLS_FIX = "use a template that renders them (the model family's own: data.chat_template=null, or its .jinja file)"


def refusal(template_name: str, i: int, m: dict, problem: str) -> str | None:
    """Why a tool-calling turn cannot be trained under this template (``problem`` from ``missing``); None for a
    plain reply, whose refusal its caller words."""
    if problem.startswith("tool call"):
        return f"{template_name} cannot render tool calls: assistant turn {i}'s {problem} is not in its rendering; " \
               f"{TOOLS_FIX}"
    if m.get("tool_calls"):
        return (f"{template_name} drops the text (reply or reasoning) of assistant turn {i}, which also calls tools, "
                "so the turn cannot be trained as written; use a template that renders both")
    return None
