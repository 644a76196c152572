"""Data (tokenize + mask), multi-turn conversations under a template that is not append-only.

Some official templates render an earlier assistant turn differently once the conversation goes on:
Qwen3 drops the ``<think>`` reasoning of every reply before the last user query, Phi-3 ends a
rendering without the generation prompt with ``<|endoftext|>``. The prefix renders of the fast path
(``tokenize.py``) then disagree with the full text, and ``data.multiturn`` says what to train on:

``final`` (default): the conversation once, as the template renders it in full; each assistant turn is
supervised as it appears there. Qwen3, ``[u1, a1 = "<think>r1</think>x1", u2, a2 = "<think>r2</think>x2"]``::

    <|im_start|>user\\nu1<|im_end|>\\n<|im_start|>assistant\\n[[x1<|im_end|>]]\\n<|im_start|>user\\nu2 ...
    ... <|im_start|>assistant\\n[[<think>\\nr2\\n</think>\\n\\nx2<|im_end|>]]\\n      (r1 is not in the text)

``per_turn``: one example per assistant turn, the messages up to and including it, supervising only
that turn (``split_per_turn``); every reply is rendered as a final turn, so Qwen3 keeps each reasoning,
at the price of rendering (and training on) the history again for every turn.

Under ``final`` a turn whose prefix renders do not match the full text is located in the full text
(``final_spans``), one extra render per conversation and one per such turn, batched:

- start: where the full text departs from ``prefix = render(messages[:i], add_generation_prompt=True)``,
  moved back to a token boundary of the prefix. It must lie at or after the start of the generation
  prompt (where ``prefix`` departs from ``render(messages[:i])``): everything before the turn must render
  as in its prefix, else the template rewrites earlier turns and the span would be a guess (refused).
- end: the reply's last character, found by rendering the conversation once more with a sentinel
  (a private-use character) after every reply (after the name of its last call, for a turn that calls
  tools: the calls end the turn), then the end-of-turn text that the template writes after that point when
  the turn is the final message (``<|im_end|>``; the rest of the call and ``</tool_call><|im_end|>``), as far
  as the full text repeats it token by token (so an earlier Phi-3 reply keeps its ``<|end|>``, without the
  ``<|endoftext|>`` that only ends the whole text).
- verified: the reply's answer (the text after ``</think>``) and every call's name lie inside its span, the
  next message's text does not, and the spans are in order.

Each conversation is rendered with its own tools (``render`` takes (messages, tools) pairs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from .chatview import missing, refusal, reply_text
from .errors import TemplateError

MARKS = "\ue000\ue001\ue002\ue003"  # private-use characters: one that no message of a conversation contains
FIX = ("set data.multiturn=per_turn (one example per assistant turn, each rendered as the final turn) or "
       "data.loss_on=last_assistant, or use a template that renders turns append-only")


def split_per_turn(conversations: list[list[dict]]) -> tuple[list[list[dict]], list[int]]:
    """data.multiturn=per_turn: one conversation per assistant turn (the messages up to and including it),
    and for each the index of the conversation it came from."""
    out, origin = [], []
    for k, msgs in enumerate(conversations):
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                out.append(msgs[:i + 1])
                origin.append(k)
    return out, origin


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def _snap(x: int, bounds: list[int]) -> int:
    """The last token boundary at or before character x."""
    return max(b for b in bounds if b <= x)


def _bounds(tokenizer, texts: list[str]) -> list[list[int]]:
    """0, every token's end and the end of each text: the places where a token boundary lies."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [sorted({0, len(t), *(int(e) for _, e in off)}) for t, off in zip(texts, enc["offset_mapping"])]


def _marked(msgs: list[dict], mark: str) -> list[dict]:
    """``msgs`` with ``mark`` after each reply, or after the name of a turn's last call (its calls end it)."""
    out = []
    for m in msgs:
        if m["role"] == "assistant" and m.get("tool_calls"):
            *calls, last = m["tool_calls"]
            m = {**m, "tool_calls": [*calls, {**last, "function": {**last["function"],
                                                                    "name": last["function"]["name"] + mark}}]}
        elif m["role"] == "assistant":
            m = {**m, "content": m["content"].rstrip() + mark}
        out.append(m)
    return out


def _replies(msgs: list[dict]) -> list[str]:
    """What precedes each reply's mark, for its trailing whitespace: the reply, or "" for a turn with calls."""
    return ["" if m.get("tool_calls") else m["content"] for m in msgs if m["role"] == "assistant"]


def _reply_ends(full: str, marked: str, replies: list[str], mark: str) -> list[int] | None:
    """Where each reply ends in ``full``, given the same conversation rendered with ``mark`` after each
    reply (``marked``), or None when ``marked`` is not ``full`` plus the marks: the template moves,
    repeats or rewrites a reply. A reply's trailing whitespace, which the mark displaced, stays its own
    when the template kept it."""
    parts = marked.split(mark)
    if len(parts) != len(replies) + 1:
        return None
    ends, pos = [], 0
    for j, reply in enumerate(replies):
        if not full.startswith(parts[j], pos):
            return None
        pos += len(parts[j])
        ws = reply[len(reply.rstrip()):]
        if ws and full.startswith(ws + parts[j + 1], pos):
            pos += len(ws)
        ends.append(pos)
    return ends if full[pos:] == parts[-1] else None


@dataclass
class _Job:
    """One conversation of the slow path, and where its renders sit in the batch."""

    msgs: list[dict]
    full: str
    todo: dict[int, str]  # turn -> its prefix render (with the generation prompt)
    placed: dict[int, tuple[int, int]]  # turn -> span, of the turns the fast path placed
    tools: Any = None  # the conversation's tools, rendered with every part of it
    mark: str = ""
    marked: int = 0  # index of render(messages with a mark after each reply)
    without: dict[int, int] = field(default_factory=dict)  # turn -> index of render(messages[:turn])
    upto: dict[int, int] = field(default_factory=dict)  # turn -> index of render(messages[:turn + 1]), then its
    #                                                     marked twin (a turn that is not the final message)
    tails: dict[int, str] = field(default_factory=dict)  # turn -> the text after its mark when it is the final message
    ends: list[int] | None = None  # where each reply ends in the full text (None: the marks did not tell)


def final_spans(tokenizer, render: Callable, items: list[tuple], template_name: str,
                name: Callable[[int], str]) -> list[dict[int, tuple[int, int]]]:
    """The spans (in the full text) of the turns whose prefix renders disagree with it.

    ``items``: per conversation (messages, full text, {turn: its prefix render}, {turn: span} of the turns
    the fast path placed, tools); ``render(pairs, generation_prompt)`` renders a batch of (messages, tools);
    ``name(k)`` names item k in errors. -> per item {turn: span}."""
    jobs = [_Job(*item) for item in items]
    texts = render(_plan(jobs), False) if jobs else []
    for job in jobs:
        ends = _reply_ends(job.full, texts[job.marked], _replies(job.msgs), job.mark) if job.mark else None
        job.ends, job.tails = ends, {i: _tail(job, i, texts) for i in job.todo} if ends else {}
    tail_bounds = iter(_bounds(tokenizer, [job.tails[i] for job in jobs for i in sorted(job.tails)]))
    prefix_bounds = iter(_bounds(tokenizer, [p for job in jobs for _, p in sorted(job.todo.items())]))
    out = []
    for k, job in enumerate(jobs):
        if not job.mark:
            raise TemplateError(f"{name(k)}: every character of {MARKS!r} occurs in this conversation, so distsft "
                                f"cannot mark its replies to find them in {template_name}'s rendering: {FIX}",
                                reason="template")
        if job.ends is None:
            raise TemplateError(
                f"{name(k)}: {template_name} moves, repeats or rewrites an assistant reply (rendered with a "
                f"mark after each reply, the conversation is not the same text plus the marks), so its tokens "
                f"cannot be masked reliably: {FIX}", reason="template")
        turns = [i for i, m in enumerate(job.msgs) if m["role"] == "assistant"]
        spans = {}
        for i, prefix in sorted(job.todo.items()):
            without = texts[job.without[i]] if i else ""
            spans[i] = _place(job, i, prefix, without, next(prefix_bounds), job.ends[turns.index(i)], job.tails[i],
                              next(tail_bounds), template_name, name(k))
        placed = {**job.placed, **spans}
        turns_in_order = sorted(placed)
        for a, b in zip(turns_in_order, turns_in_order[1:]):
            if placed[b][0] < placed[a][1]:
                raise TemplateError(_misplaced(name(k), template_name, b), reason="template")
        out.append(spans)
    return out


def _plan(jobs: list[_Job]) -> list[tuple[list[dict], Any]]:
    """Every render the slow path needs, in one batch; each job records where its renders sit."""
    batch = []
    for job in jobs:
        job.mark = next((c for c in MARKS if c not in json.dumps([job.msgs, job.tools], ensure_ascii=False)), "")
        mark = job.mark or MARKS[0]
        job.marked = len(batch)
        batch.append((_marked(job.msgs, mark), job.tools))
        for i in job.todo:
            if i:
                job.without[i] = len(batch)
                batch.append((job.msgs[:i], job.tools))
            if i != len(job.msgs) - 1:
                job.upto[i] = len(batch)
                batch += [(job.msgs[:i + 1], job.tools), (_marked(job.msgs[:i + 1], mark), job.tools)]
    return batch


def _tail(job: _Job, i: int, texts: list[str]) -> str:
    """The text the template writes after turn i's mark when the turn is the final message (its end of turn;
    the rest of its last call too), "" when that rendering does not show where the mark is."""
    upto, marked = (texts[job.upto[i]], texts[job.upto[i] + 1]) if i in job.upto else (job.full, texts[job.marked])
    ends = _reply_ends(upto, marked, _replies(job.msgs[:i + 1]), job.mark)
    return upto[ends[-1]:len(upto.rstrip())] if ends else ""


def _place(job: _Job, i: int, prefix: str, without: str, pb: list[int], end: int, tail: str, tb: list[int],
           template_name: str, where: str) -> tuple[int, int]:
    """The span of turn i in the full text: from where the text departs from its prefix render (at a
    token boundary, not before the generation prompt) to the reply's end plus the end-of-turn text."""
    full = job.full
    gen_start = _snap(_lcp(prefix, without), pb)
    agree = _lcp(prefix, full)
    if agree < gen_start:
        raise TemplateError(f"{where}: {template_name} renders conversation prefixes inconsistently (turn {i} "
                            f"changes earlier text), so assistant spans are ambiguous: {FIX}", reason="template")
    start = _snap(agree, pb)
    b = max(b for b in tb if full.startswith(tail[:b], end))  # as much of the end of turn as repeats
    m, nxt = job.msgs[i], _next_text(job.msgs, i)
    problem = missing(m, full[start:end])
    if problem:
        tools = refusal(template_name, i, m, problem)
        raise TemplateError(f"{where}: {tools}" if tools else _misplaced(where, template_name, i), reason="template")
    if nxt and nxt not in reply_text(m) and -1 < full.find(nxt, start) < end:
        raise TemplateError(_misplaced(where, template_name, i), reason="template")
    return start, max(start, len(full[:end + b].rstrip()))


def _next_text(msgs: list[dict], i: int) -> str:
    return (msgs[i + 1].get("content") or "").strip() if i + 1 < len(msgs) else ""


def _misplaced(where: str, template_name: str, i: int) -> str:
    return (f"{where}: {template_name} does not render assistant turn {i} between its generation prompt and the "
            f"end of the turn, so its tokens cannot be masked reliably: {FIX}")
