"""Data (tokenize + mask): render chat messages with a template, tokenize, label.

The supervised spans are derived from the rendered text, not from ``{% generation %}``
markers (most model templates lack them). For assistant turn *i*::

    prefix = render(messages[:i], add_generation_prompt=True)   # ...<|im_start|>assistant\\n
    upto   = render(messages[:i + 1])                           # ... + reply + <|im_end|>\\n
    span   = [len(prefix), len(upto.rstrip()))                  # reply + end-of-turn token

Both must be prefixes of the full rendering. A template that is not append-only (Qwen3 drops
the reasoning of earlier replies, Phi-3 ends a rendering with ``<|endoftext|>``) fails that for some
turns; those are located in the full text instead (``multiturn.final_spans``: the
``data.multiturn=final`` rule), or the conversation was split per turn beforehand
(``data.multiturn=per_turn``: only each example's last turn is needed, ``turns="last"``).
Tool-calling rows render the same way, each conversation with its own tools
(``apply_chat_template(messages, tools=tools)``): an assistant turn's calls are in its span, tool results
(not assistant turns) are not. What the template is given, and how reasoning reaches it, is ``chatview.py``'s;
with ``data.train_on_reasoning=false`` the reasoning text is cut out of the spans (``reasoning_spans``).
A template that renders no trace of a turn's call, or of a row's tools, or fails on the row, is refused
naming the row.
A token is supervised when it overlaps a span (a BPE merge across the boundary, such as
"assistant: " + "2" -> " 2", keeps the reply's first token supervised). ``labels`` are aligned
with ``input_ids`` (the loss shifts them); ``labels[0]`` is always -100 because nothing in the
document predicts its first token.

Cost per conversation of A assistant turns: 2A renders (the last turn's ``upto`` is the full
text), all conversations of a chunk rendered in one ``apply_chat_template`` call per kind, one
batched encode with offsets, and a vectorised overlap test (``searchsorted`` of the token starts
over the span ends) instead of a per-token loop::

    spans  [(5, 9), (14, 20)]          token offsets (0,3) (3,6) (6,9) (9,14) (14,15) (15,21)
    k = searchsorted(ends=[9, 20], starts=[0, 3, 6, 9, 14, 15], side="right") = [0, 0, 0, 1, 1, 1]
    supervised = ends_of_tokens > span_starts[k] = [F, T, T, F, T, T]
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .chatview import (
    TOOLS_FIX,
    has_reasoning_field,
    missing,
    reasoning_mode,
    reasoning_spans,
    refusal,
    tools_view,
    unwritten,
    view,
)
from .errors import TemplateError  # noqa: F401 (imported from here by callers)
from .multiturn import final_spans

IGNORE = -100


def _render(tokenizer, messages, template, generation_prompt: bool, tools=None):
    """One conversation (a list of messages) or a batch (a list of them, sharing ``tools``) -> text(s)."""
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


_COMPILED: dict = {}  # (tokenizer id, template) -> a batch renderer, or None when only apply_chat_template will do


def _key(tokenizer, template: str | None) -> tuple:
    return id(tokenizer), template, str(sorted(tokenizer.special_tokens_map.items()))  # bos/eos are variables


def _batch_renderer(tokenizer, template: str | None, sample: tuple[list[dict], Any]):
    """Render a batch of (messages, tools) with the compiled template and the same variables
    ``apply_chat_template`` passes (it spends most of its time copying messages, which ours do not need).
    Used only after it rendered ``sample`` exactly as ``apply_chat_template`` does."""
    key = _key(tokenizer, template)
    if key not in _COMPILED:
        _COMPILED[key] = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data

            compiled = _compile_jinja_template(template or tokenizer.chat_template)
            variables = _plain_template_data(dict(tokenizer.special_tokens_map))

            def render(pairs, generation_prompt):
                return [compiled.render(messages=m, tools=t, documents=None,
                                        add_generation_prompt=generation_prompt, **variables) for m, t in pairs]

            if all(render([sample], g) == [_render(tokenizer, sample[0], template, g, sample[1])]
                   for g in (False, True)):
                _COMPILED[key] = render
        except Exception:  # another transformers version, or a template that needs the full path
            pass
    return _COMPILED[key] or (lambda pairs, g: [_render(tokenizer, m, template, g, t) for m, t in pairs])


def _spans_of(messages: list[dict], full: str, turns: list[int], prefixes: list[str], uptos: list[str],
              template_name: str) -> dict[int, tuple[int, int] | None]:
    """{turn: the character span of its reply (+ end-of-turn) in ``full``}, verified; None for a turn whose
    prefix renders are not prefixes of ``full`` (the template is not append-only there)."""
    spans = {}
    for i, prefix, upto in zip(turns, prefixes, uptos):
        if not (upto.startswith(prefix) and full.startswith(upto)):
            spans[i] = None
            continue
        span = (len(prefix), len(upto.rstrip()))
        # verify: the reply and its calls must lie inside its span (templates may trim them, never move them)
        problem = missing(messages[i], full[span[0]:span[1]])
        if problem:
            raise TemplateError(refusal(template_name, i, messages[i], problem) or
                                f"{template_name} does not render assistant turn {i} between its generation prompt "
                                "and the end of the turn, so its tokens cannot be masked reliably", reason="template")
        spans[i] = span
    return spans


def _views(tokenizer, conversations, template, tools) -> tuple[list[list[dict]], list, str]:
    """(the messages each template reads, the tools of each conversation, how reasoning reaches the template):
    see ``chatview.py``."""
    tools = [tools_view(t) for t in tools] if tools is not None else [None] * len(conversations)
    mode = "field"
    if any(has_reasoning_field(c) for c in conversations):
        mode = reasoning_mode(lambda msgs: _render(tokenizer, msgs, template, False), _key(tokenizer, template))
    return [view(c, mode) for c in conversations], tools, mode


def render_with_spans(tokenizer, conversations: list[list[dict]], template: str | None,
                      template_name: str = "the chat template",
                      where: Callable[[int], str] | None = None,
                      turns: str = "all", tools: list | None = None,
                      reasoning: bool = True) -> list[tuple[str, list[tuple[int, int]]]]:
    """(full text, assistant spans) of each conversation; ``where(k)`` names conversation k in errors.
    ``turns``: the spans of every assistant turn ("all"), of the last one ("last"), or none ("none").
    ``tools``: each conversation's tools (stored JSON or a list; None: none); ``reasoning``: whether the
    reasoning text stays in the spans (``data.train_on_reasoning``)."""
    conversations, tools, mode = _views(tokenizer, conversations, template, tools)
    prefix_convs, upto_convs, plan = [], [], []
    for msgs, t in zip(conversations, tools):
        replies = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        sel = replies if turns == "all" else replies[-1:] if turns == "last" else []
        last_is_reply = bool(sel) and sel[-1] == len(msgs) - 1
        plan.append((len(prefix_convs), len(upto_convs), sel, last_is_reply))
        prefix_convs += [(msgs[:i], t) for i in sel]
        # upto of every turn but a final reply (its upto is the full text), then the full text itself
        upto_convs += [(msgs[:i + 1], t) for i in (sel[:-1] if last_is_reply else sel)] + [(msgs, t)]
    # an empty prefix renders as "" (apply_chat_template refuses an empty conversation)
    nonempty = [c for c in prefix_convs if c[0]]
    try:
        render = _batch_renderer(tokenizer, template, (conversations[0], tools[0])) if conversations else None
        rendered = iter(render(nonempty, True) if nonempty else [])
        uptos = render(upto_convs, False) if upto_convs else []
    except Exception as e:  # a template's raise_exception, a type error inside Jinja: name the conversation
        raise _render_error(tokenizer, conversations, tools, template, template_name, where, e) from None
    prefixes = [next(rendered) if c[0] else "" for c in prefix_convs]
    name = (lambda k: where(k)) if where else (lambda k: f"conversation {k}")
    out, slow = [], []
    for k, (msgs, t, (p, u, sel, last_is_reply)) in enumerate(zip(conversations, tools, plan)):
        n = len(sel)
        full = uptos[u + n - last_is_reply]
        mine = uptos[u:u + n - last_is_reply] + ([full] if last_is_reply else [])
        try:
            _check_tools(full, t, template_name)
            spans = _spans_of(msgs, full, sel, prefixes[p:p + n], mine, template_name)
        except TemplateError as e:
            raise TemplateError(f"{name(k)}: {e}", reason=e.reason) from None
        out.append((full, spans))
        if None in spans.values():  # not append-only here: find those turns in the full text
            todo = {i: prefixes[p + j] for j, i in enumerate(sel) if spans[i] is None}
            slow.append((k, (msgs, full, todo, {i: s for i, s in spans.items() if s is not None}, t)))
    if slow:
        found = final_spans(tokenizer, render, [item for _, item in slow], template_name,
                            lambda j: name(slow[j][0]))
        for (k, _), spans in zip(slow, found):
            out[k][1].update(spans)
    for k, ((full, spans), msgs) in enumerate(zip(out, conversations)):
        if mode == "content" and (i := unwritten(full, msgs, spans)) is not None:
            raise TemplateError(f"{name(k)}: {refusal(template_name, i, msgs[i], 'text')}", reason="template")
    return [(full, [spans[i] for i in sorted(spans)] if reasoning else
             reasoning_spans(full, msgs, sorted(spans), [spans[i] for i in sorted(spans)]))
            for (full, spans), msgs in zip(out, conversations)]


def _check_tools(full: str, tools: list[dict] | None, template_name: str) -> None:
    """A row's tools must show in its rendering (by name): a template that ignores ``tools`` is refused."""
    for tool in tools or []:
        if tool["function"]["name"] not in full:
            raise TemplateError(f"{template_name} cannot render tools: the row's tool {tool['function']['name']!r} is "
                                f"nowhere in its rendering; {TOOLS_FIX}", reason="template")


def _render_error(tokenizer, conversations, tools, template, template_name, where, error: Exception) -> TemplateError:
    """The batch failed to render: find the first conversation that fails alone and name it."""
    for k, (msgs, t) in enumerate(zip(conversations, tools)):
        try:
            _render(tokenizer, msgs, template, False, t)
        except Exception as e:  # noqa: PERF203 (only on the error path)
            error, name = e, where(k) if where else f"conversation {k}"
            why = f"{type(e).__name__}: {e}".replace("\n", " ")
            if t or any(m["role"] == "tool" or m.get("tool_calls") for m in msgs):
                return TemplateError(f"{name}: {template_name} cannot render this tool-calling conversation ({why}): "
                                     "leave such rows out, or use a template that renders them", reason="template")
            return TemplateError(f"{name}: {template_name} failed to render it ({why})", reason="template")
    return TemplateError(f"{template_name} failed to render a batch ({type(error).__name__}: {error})",
                         reason="template")


def overlaps(starts: np.ndarray, ends: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """[n] bool: token [starts[t], ends[t]) overlaps one of ``spans`` (sorted, non-overlapping, as
    append-only rendering makes them). The first span ending after the token's start is the only one
    it can overlap without also overlapping that one."""
    if not spans:
        return np.zeros(len(starts), bool)
    s, e = np.asarray(spans, np.int64).T
    k = np.searchsorted(e, starts, side="right")  # first span with end > token start
    hit = k < len(e)
    hit[hit] = ends[hit] > s[k[hit]]
    return hit


def _token_range(enc, n: int, s: int, e: int) -> tuple[int, int]:
    """[first, stop) of the tokens overlapping characters [s, e), from the encoding's char <-> token maps
    (a few lookups per span instead of reading every token's offsets; tokens are in text order)."""
    first = None
    for c in range(s, e):  # the first character of the span that a token covers (spaces may be in none)
        if (first := enc.char_to_token(c)) is not None:
            break
    if first is None:
        return 0, 0
    while first > 0 and enc.token_to_chars(first - 1)[1] > s:  # an earlier token ending inside the span
        first -= 1
    last = next(t for c in range(e - 1, s - 1, -1) if (t := enc.char_to_token(c)) is not None)
    while last + 1 < n and enc.token_to_chars(last + 1)[0] < e:  # a later token starting inside the span
        last += 1
    return first, last + 1


def _encode_masked(tokenizer, texts: list[str],
                   spans: list[list[tuple[int, int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids [n] int64, overlaps-a-span [n] bool) of each text, no special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        out = []
        for enc, sp in zip(backend.encode_batch(texts, add_special_tokens=False), spans):
            n = len(enc)
            sup = np.zeros(n, bool)
            for s, e in sp:
                a, b = _token_range(enc, n, s, e)
                sup[a:b] = True
            out.append((np.array(enc.ids, np.int64), sup))
        return out
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)  # a tokenizer without a backend
    out = []
    for ids, off, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        off = np.asarray(off, np.int64).reshape(-1, 2)
        out.append((np.asarray(ids, np.int64), overlaps(off[:, 0], off[:, 1], sp)))
    return out


def encode_conversations(tokenizer, conversations: list[list[dict]], loss_on: str, template: str | None = None,
                         template_name: str = "the chat template",
                         where: Callable[[int], str] | None = None, tools: list | None = None,
                         reasoning: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids [n] int64, supervised [n] bool) of each conversation; labels = ids where supervised.
    ``tools``: each conversation's tools; ``reasoning``: supervise the reasoning (``data.train_on_reasoning``)."""
    turns = {"all": "none", "last_assistant": "last"}.get(loss_on, "all")
    rendered = render_with_spans(tokenizer, conversations, template, template_name, where, turns, tools, reasoning)
    keep = [spans for _, spans in rendered]
    out = _encode_masked(tokenizer, [t for t, _ in rendered], keep)
    for ids, sup in out:
        if loss_on == "all":
            sup[:] = True
        sup[:1] = False  # nothing in the document predicts its first token
    return out
