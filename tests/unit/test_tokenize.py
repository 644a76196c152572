"""Tokenize + mask: only assistant replies and their end-of-turn token carry loss."""

from __future__ import annotations

import pytest

from distsft.data.tokenize import IGNORE, TemplateError, tokenize_messages

CONV = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
    {"role": "user", "content": "Spell apple backwards."},
    {"role": "assistant", "content": "elppa"},
]


def supervised_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, y in zip(enc["input_ids"], enc["labels"]) if y != IGNORE])


def test_assistant_only_mask(tokenizer):
    enc = tokenize_messages(tokenizer, CONV, "assistant")
    assert supervised_text(tokenizer, enc) == "2 plus 2 is 4.<|im_end|>elppa<|im_end|>"
    assert enc["labels"][0] == IGNORE
    # supervised labels equal their input ids (the loss shifts, not the data)
    assert all(y in (IGNORE, t) for t, y in zip(enc["input_ids"], enc["labels"]))


def test_last_assistant_and_all(tokenizer):
    last = tokenize_messages(tokenizer, CONV, "last_assistant")
    assert supervised_text(tokenizer, last) == "elppa<|im_end|>"
    full = tokenize_messages(tokenizer, CONV, "all")
    assert full["labels"][1:] == full["input_ids"][1:] and full["labels"][0] == IGNORE


def test_template_without_generation_markers_is_masked_from_rendering(tokenizer):
    plain = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    enc = tokenize_messages(tokenizer, CONV, "assistant", template=plain)
    assert supervised_text(tokenizer, enc) == "2 plus 2 is 4.<|im_end|>elppa<|im_end|>"


def test_token_merged_across_the_reply_boundary_stays_supervised(tokenizer):
    # the generation prompt ends in a space that BPE merges with the reply's first word
    spaced = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
    text = supervised_text(tokenizer, tokenize_messages(tokenizer, CONV, "assistant", template=spaced))
    assert text.replace(" ", "") == "2plus2is4.<|im_end|>elppa<|im_end|>"


def test_inconsistent_template_is_refused(tokenizer):
    # renders the number of messages up front: every prefix changes when a turn is added
    bad = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(TemplateError, match="renders conversation prefixes inconsistently"):
        tokenize_messages(tokenizer, CONV, "assistant", template=bad)
