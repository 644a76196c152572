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
"""

from __future__ import annotations

from typing import Any

from .sources import DataError

IGNORE = -100


class TemplateError(DataError):
    """A chat template whose rendering does not allow an unambiguous assistant mask."""


def _render(tokenizer, messages, template, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], template: str | None,
                    template_name: str = "the chat template") -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans of every assistant reply (+ end-of-turn)."""
    full = _render(tokenizer, messages, template, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], template, True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], template, False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise TemplateError(
                f"{template_name} renders conversation prefixes inconsistently (turn {i} changes earlier text), "
                "so assistant spans are ambiguous; use a template that renders turns append-only",
                reason="template")
        span = (len(prefix), len(upto.rstrip()))
        # verify: the reply itself must lie inside its span (templates may trim it, never move it)
        if m["content"].strip() not in full[span[0]:span[1]]:
            raise TemplateError(
                f"{template_name} does not render assistant turn {i} between its generation prompt and the "
                "end of the turn, so its tokens cannot be masked reliably", reason="template")
        spans.append(span)
    return full, spans


def tokenize_messages(tokenizer, messages: list[dict], loss_on: str, template: str | None = None,
                      template_name: str = "the chat template") -> dict[str, Any]:
    """-> {"input_ids": [...], "labels": [...]} for one conversation."""
    text, spans = assistant_spans(tokenizer, messages, template, template_name)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if loss_on == "all":
        labels = list(ids)
    else:
        keep = spans[-1:] if loss_on == "last_assistant" else spans
        labels = [t if any(o[0] < e and o[1] > s for s, e in keep) else IGNORE for t, o in zip(ids, offsets)]
    if labels:
        labels[0] = IGNORE
    return {"input_ids": ids, "labels": labels}
