"""Data stage 3 (tokenize + mask): render chat messages with a template, tokenize, label.

The supervised spans are derived from the rendered text, not from ``{% generation %}``
markers (most model templates lack them). For assistant turn *i*::

    prefix = render(messages[:i], add_generation_prompt=True)   # ...<|im_start|>assistant\\n
    upto   = render(messages[:i + 1])                           # ... + reply + <|im_end|>\\n
    span   = [len(prefix), len(upto.rstrip()))                  # reply + end-of-turn token

Both must be prefixes of the full rendering, otherwise the template renders turns
inconsistently and the spans would be guesses: we stop with a message naming the template.
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

from .errors import DataError

IGNORE = -100


class TemplateError(DataError):
    """A chat template whose rendering does not allow an unambiguous assistant mask."""


def _render(tokenizer, messages, template, generation_prompt: bool):
    """One conversation (a list of messages) or a batch (a list of them) -> text(s)."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _spans_of(messages: list[dict], full: str, prefixes: list[str], uptos: list[str],
              template_name: str) -> list[tuple[int, int]]:
    """The character span of every assistant reply (+ end-of-turn) in ``full``, verified."""
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i, prefix, upto in zip(turns, prefixes, uptos):
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise TemplateError(
                f"{template_name} renders conversation prefixes inconsistently (turn {i} changes earlier text), "
                "so assistant spans are ambiguous; use a template that renders turns append-only",
                reason="template")
        span = (len(prefix), len(upto.rstrip()))
        # verify: the reply itself must lie inside its span (templates may trim it, never move it)
        if messages[i]["content"].strip() not in full[span[0]:span[1]]:
            raise TemplateError(
                f"{template_name} does not render assistant turn {i} between its generation prompt and the "
                "end of the turn, so its tokens cannot be masked reliably", reason="template")
        spans.append(span)
    return spans


def render_with_spans(tokenizer, conversations: list[list[dict]], template: str | None,
                      template_name: str = "the chat template",
                      where: Callable[[int], str] | None = None) -> list[tuple[str, list[tuple[int, int]]]]:
    """(full text, assistant spans) of each conversation; ``where(k)`` names conversation k in errors."""
    prefix_convs, upto_convs, plan = [], [], []
    for msgs in conversations:
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        last_is_reply = bool(turns) and turns[-1] == len(msgs) - 1
        plan.append((len(prefix_convs), len(upto_convs), len(turns), last_is_reply))
        prefix_convs += [msgs[:i] for i in turns]
        # upto of every turn but a final reply (its upto is the full text), then the full text itself
        upto_convs += [msgs[:i + 1] for i in (turns[:-1] if last_is_reply else turns)] + [msgs]
    # an empty prefix renders as "" (apply_chat_template refuses an empty conversation)
    nonempty = [c for c in prefix_convs if c]
    try:
        rendered = iter(_render(tokenizer, nonempty, template, True) if nonempty else [])
        uptos = _render(tokenizer, upto_convs, template, False)
    except Exception as e:  # a template's raise_exception, a type error inside Jinja: name the conversation
        raise _render_error(tokenizer, conversations, template, template_name, where, e) from None
    prefixes = [next(rendered) if c else "" for c in prefix_convs]
    out = []
    for k, (msgs, (p, u, n, last_is_reply)) in enumerate(zip(conversations, plan)):
        full = uptos[u + n - last_is_reply]
        mine = uptos[u:u + n - last_is_reply] + ([full] if last_is_reply else [])
        try:
            out.append((full, _spans_of(msgs, full, prefixes[p:p + n], mine, template_name)))
        except TemplateError as e:
            raise TemplateError(f"{where(k)}: {e}" if where else str(e), reason=e.reason) from None
    return out


def _render_error(tokenizer, conversations, template, template_name, where, error: Exception) -> TemplateError:
    """The batch failed to render: find the first conversation that fails alone and name it."""
    for k, msgs in enumerate(conversations):
        try:
            _render(tokenizer, msgs, template, False)
        except Exception as e:  # noqa: PERF203 (only on the error path)
            error, name = e, where(k) if where else f"conversation {k}"
            return TemplateError(f"{name}: {template_name} failed to render it ({type(e).__name__}: {e})",
                                 reason="template")
    return TemplateError(f"{template_name} failed to render a batch ({type(error).__name__}: {error})",
                         reason="template")


def assistant_spans(tokenizer, messages: list[dict], template: str | None,
                    template_name: str = "the chat template") -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans of every assistant reply (+ end-of-turn)."""
    return render_with_spans(tokenizer, [messages], template, template_name)[0]


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


def _encode(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids [n], offsets [n, 2]) of each text, no special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        out = []
        for enc in backend.encode_batch(texts, add_special_tokens=False):
            n = len(enc.ids)
            off = np.fromiter((c for pair in enc.offsets for c in pair), np.int64, 2 * n).reshape(n, 2)
            out.append((np.fromiter(enc.ids, np.int64, n), off))
        return out
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(np.asarray(ids, np.int64), np.asarray(off, np.int64).reshape(-1, 2))
            for ids, off in zip(enc["input_ids"], enc["offset_mapping"])]


def encode_conversations(tokenizer, conversations: list[list[dict]], loss_on: str, template: str | None = None,
                         template_name: str = "the chat template",
                         where: Callable[[int], str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids [n] int64, supervised [n] bool) of each conversation; labels = ids where supervised."""
    rendered = render_with_spans(tokenizer, conversations, template, template_name, where)
    out = []
    for (text, spans), (ids, off) in zip(rendered, _encode(tokenizer, [t for t, _ in rendered])):
        if loss_on == "all":
            sup = np.ones(len(ids), bool)
        else:
            sup = overlaps(off[:, 0], off[:, 1], spans[-1:] if loss_on == "last_assistant" else spans)
        sup[:1] = False  # nothing in the document predicts its first token
        out.append((ids, sup))
    return out


def tokenize_messages(tokenizer, messages: list[dict], loss_on: str, template: str | None = None,
                      template_name: str = "the chat template") -> dict[str, Any]:
    """-> {"input_ids": [...], "labels": [...]} for one conversation."""
    ids, sup = encode_conversations(tokenizer, [messages], loss_on, template, template_name)[0]
    return {"input_ids": ids.tolist(), "labels": np.where(sup, ids, IGNORE).tolist()}
