"""Tokenize + mask: only assistant replies and their end-of-turn token carry loss."""

from __future__ import annotations

import numpy as np
import pytest

from distsft.data.tokenize import IGNORE, TemplateError
from tests.helpers import tokenize_messages

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


# ---- the fast mask (batched renders, char<->token lookups) equals the plain per-token definition ----------

def reference_tokenize(tokenizer, messages, loss_on, template=None):
    """The definition, written plainly: render every prefix with apply_chat_template, take each assistant
    span, and supervise a token when its offsets overlap a span (a per-token loop)."""
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)

    full, spans = render(messages, False), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            spans.append((len(render(messages[:i], True)) if i else 0, len(render(messages[:i + 1], False).rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    keep = spans[-1:] if loss_on == "last_assistant" else spans
    labels = [t if loss_on == "all" or any(a < e and b > s for s, e in keep) else IGNORE
              for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
    return {"input_ids": enc["input_ids"], "labels": [IGNORE] + labels[1:]}


TEMPLATES = {
    "own": None,
    "spaced": ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}assistant: {% endif %}"),
    "trimmed": ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant:\n{% endif %}"),
    # the span ends on the reply's last character: an emoji there is several byte tokens with one offset
    "no_end_marker": ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}"),
    "bos_and_eos": ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


def conversations():
    from distsft.assets.build import make_examples

    odd = [  # spaces at the boundaries, non-ASCII (multi-byte: several tokens share a character's offsets), empty
        [{"role": "user", "content": "  ünïcödé ✓ 漢字 🙂 "}, {"role": "assistant", "content": " 🙂🙂 ñ  "}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "x"},
         {"role": "assistant", "content": "\n\ny\n"}, {"role": "user", "content": "z"},
         {"role": "assistant", "content": "   w"}],
        [{"role": "user", "content": "🙂"}, {"role": "assistant", "content": "🙂漢"}, {"role": "user", "content": "é"},
         {"role": "assistant", "content": "ok 🙂"}],
        [{"role": "assistant", "content": "first turn is the assistant's"}, {"role": "user", "content": "ok"},
         {"role": "assistant", "content": "ok"}],
    ]
    return [e["messages"] for e in make_examples(40, seed=3)] + odd


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_masks_equal_the_per_token_definition(tokenizer, name):
    from distsft.data.tokenize import encode_conversations

    convs = conversations()
    for loss_on in ("assistant", "last_assistant", "all"):
        batch = encode_conversations(tokenizer, convs, loss_on, TEMPLATES[name])  # one batch, as a cache shard does
        for msgs, (ids, sup) in zip(convs, batch):
            ref = reference_tokenize(tokenizer, msgs, loss_on, TEMPLATES[name])
            assert ids.tolist() == ref["input_ids"]
            assert np.where(sup, ids, IGNORE).tolist() == ref["labels"], (name, loss_on, msgs)


def test_span_overlap_by_searchsorted_equals_the_loop():
    from distsft.data.tokenize import overlaps

    rng = np.random.default_rng(0)
    for _ in range(300):
        cuts = np.sort(rng.choice(200, size=2 * rng.integers(0, 5), replace=False))
        spans = [(int(a), int(b)) for a, b in cuts.reshape(-1, 2)]
        starts = np.sort(rng.integers(0, 200, 60))
        ends = starts + rng.integers(0, 6, 60)  # zero-width and overlapping tokens too
        loop = [any(a < e and b > s for s, e in spans) for a, b in zip(starts, ends)]
        assert overlaps(starts, ends, spans).tolist() == loop


def test_a_template_that_fails_names_the_conversation(tokenizer):
    from distsft.data.tokenize import encode_conversations

    strict = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
              "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    convs = [CONV, [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]]
    with pytest.raises(TemplateError, match=r"data.jsonl row 9: the chat template failed to render it .*no boom"):
        encode_conversations(tokenizer, convs, "assistant", strict, where=lambda k: f"data.jsonl row {8 + k}")
