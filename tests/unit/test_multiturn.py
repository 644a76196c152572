"""data.multiturn: multi-turn conversations under templates that are not append-only (Qwen3 drops the
reasoning of earlier replies, Phi-3 ends a rendering with <|endoftext|>), through the streaming
preparation: ``final`` supervises every reply as the full rendering shows it, ``per_turn`` makes one
example per reply; append-only templates keep their masks token for token."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from distsft.config import ConfigError, DataConfig
from distsft.data.multiturn import split_per_turn
from distsft.data.prepare import cache_key, prepare
from distsft.data.templates import BUILTIN
from distsft.data.tokenize import IGNORE, TemplateError, encode_conversations
from tests.chat_families import TEMPLATES, family_tokenizer
from tests.conftest import typed_cfg

SYS = {"role": "system", "content": "Be brief."}
U1, U2, U3 = ({"role": "user", "content": c} for c in ("What is 2 plus 2?", "Spell apple backwards.", "And 3 plus 3?"))
R1 = {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n2 plus 2 is 4."}
R2 = {"role": "assistant", "content": "<think>Reverse the letters.</think>elppa"}
A3 = {"role": "assistant", "content": "6."}
QWEN3_ROW = [SYS, U1, R1, U2, R2]


@pytest.fixture(scope="module")
def families(tokenizer):
    return {n: family_tokenizer(tokenizer, n) for n in ("qwen3", "phi3", "gemma", "chatml")}


def write(tmp_path, rows) -> str:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return str(p)


def prep(tmp_path, tokenizer, rows, **kw):
    return prepare(DataConfig(train_files=[write(tmp_path, rows)], val_fraction=0, cache=False, **kw), tokenizer)


def supervised_runs(tokenizer, ids, labels) -> list[str]:
    """The supervised text, one string per run of supervised tokens."""
    runs, run = [], []
    for t, y in zip(list(ids) + [None], list(labels) + [IGNORE]):
        if y != IGNORE:
            run.append(int(t))
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def examples(tokenizer, store) -> list[tuple[str, list[str], str]]:
    """(text, supervised runs, origin) of every example."""
    out = []
    for i in range(len(store)):
        ids, labels = store.example(i)
        out.append((tokenizer.decode(ids), supervised_runs(tokenizer, ids, labels), store.origin(i)))
    return out


@pytest.mark.parametrize("template", ["qwen3", str(TEMPLATES / "qwen3.jinja")])
def test_qwen3_reasoning_in_earlier_turns_trains_under_the_default(tmp_path, families, template):
    """The default rule (final): one example per conversation; the earlier reply without its reasoning
    (as the official template renders it), the last one with it."""
    tok = families["qwen3"]
    data = prep(tmp_path, tok, [QWEN3_ROW, [U1, R1]], chat_template=template)
    assert DataConfig().multiturn == "final"
    (text, runs, origin), (_, single, _) = examples(tok, data.train)
    assert "Add them." not in text and "<think>\nReverse the letters.\n</think>" in text
    assert runs == ["2 plus 2 is 4.<|im_end|>", "<think>\nReverse the letters.\n</think>\n\nelppa<|im_end|>"]
    assert single == ["<think>\nAdd them.\n</think>\n\n2 plus 2 is 4.<|im_end|>"]  # one turn: it keeps its reasoning
    assert origin.endswith("d.jsonl row 1") and data.train_stats.kept == 2 and data.train_stats.rows_in == 2


def test_qwen3_per_turn_keeps_every_reasoning(tmp_path, families):
    tok = families["qwen3"]
    data = prep(tmp_path, tok, [[U1, A3], QWEN3_ROW], chat_template="qwen3", multiturn="per_turn")
    got = examples(tok, data.train)
    assert [r for _, r, _ in got] == [["<think>\n\n</think>\n\n6.<|im_end|>"],
                                      ["<think>\nAdd them.\n</think>\n\n2 plus 2 is 4.<|im_end|>"],
                                      ["<think>\nReverse the letters.\n</think>\n\nelppa<|im_end|>"]]
    assert [o.rsplit(" ", 1)[1] for _, _, o in got] == ["1", "2", "2"]  # each example names its source row
    assert "Add them." not in got[2][0]  # the history of the second turn is rendered as the template does
    s = data.train_stats
    assert (s.rows_in, s.per_turn_examples, s.kept) == (2, 3, 3)


def test_final_spans_follow_the_rule_on_many_conversations(families):
    """Random Qwen3 conversations (reasoning or not, a system turn or not, ending with a reply or a user
    turn): each reply is supervised as the rule says, nothing else is."""
    tok, rng = families["qwen3"], random.Random(0)
    convs, want = [], []
    for _ in range(40):
        msgs = [SYS] if rng.random() < 0.5 else []
        turns = rng.randint(1, 4)
        for t in range(turns):
            answer, reason = f"answer {t} {rng.randint(0, 99)}", rng.choice(["", f"think {t}", "a\nb"])
            msgs += [{"role": "user", "content": f"question {t}"},
                     {"role": "assistant", "content": f"<think>{reason}</think>\n\n{answer}" if reason else answer}]
        ends_with_user = rng.random() < 0.2
        if ends_with_user:
            msgs.append({"role": "user", "content": "more?"})
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        expect = [r.split("</think>")[-1].strip() + "<|im_end|>" for r in replies]
        if not ends_with_user:  # the reply after the last query keeps its reasoning (an empty one if none)
            reason = replies[-1].split("</think>")[0].split("<think>")[-1] if "</think>" in replies[-1] else ""
            expect[-1] = f"<think>\n{reason}\n</think>\n\n" + expect[-1]
        convs.append(msgs)
        want.append(expect)
    qwen3 = (TEMPLATES / "qwen3.jinja").read_text()
    for msgs, expect, (ids, sup) in zip(convs, want, encode_conversations(tok, convs, "assistant", qwen3)):
        assert supervised_runs(tok, ids, np.where(sup, ids, IGNORE)) == expect, msgs


def test_phi3_ends_earlier_turns_at_end_and_keeps_the_final_endoftext(tmp_path, families):
    tok = families["phi3"]
    rows = [[SYS, U1, {"role": "assistant", "content": "4."}, U2, {"role": "assistant", "content": "elppa"}]]
    (_, runs, _), = examples(tok, prep(tmp_path, tok, rows, chat_template="phi3").train)
    assert runs == ["4.<|end|>", "elppa<|end|>\n<|endoftext|>"]
    (_, a, _), (_, b, _) = examples(tok, prep(tmp_path, tok, rows, chat_template="phi3", multiturn="per_turn").train)
    assert (a, b) == (["4.<|end|>\n<|endoftext|>"], ["elppa<|end|>\n<|endoftext|>"])


def test_append_only_masks_are_unchanged_and_per_turn_splits_them(families):
    """chatml and gemma are append-only: the fast path decides every mask (the rule changes nothing), and
    per_turn's examples are the conversation's prefixes supervised on their last reply."""
    from distsft.assets.build import make_examples

    convs = [e["messages"] for e in make_examples(30, seed=5)]
    multi = [[U1, A3, U2, {"role": "assistant", "content": "elppa"}]]
    for name in ("chatml", "gemma"):
        tok = families[name]
        template = BUILTIN[name].source
        batch = convs + multi
        both = encode_conversations(tok, batch, "assistant", template)
        for msgs, (ids, sup) in zip(batch, both):  # each reply's span is [len(prefix), len(upto.rstrip()))
            text = tok.decode(ids)
            want = []
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    p = tok.apply_chat_template(msgs[:i], chat_template=template, tokenize=False,
                                                add_generation_prompt=True) if i else ""
                    u = tok.apply_chat_template(msgs[:i + 1], chat_template=template, tokenize=False).rstrip()
                    assert text.startswith(u)
                    want.append(u[len(p):])
            assert supervised_runs(tok, ids, np.where(sup, ids, IGNORE)) == want
        split, origin = split_per_turn(multi)
        assert [len(c) for c in split] == [2, 4] and origin == [0, 0]
        per = encode_conversations(tok, split, "last_assistant", template)
        full = supervised_runs(tok, both[-1][0], np.where(both[-1][1], both[-1][0], IGNORE))
        assert [supervised_runs(tok, i, np.where(s, i, IGNORE)) for i, s in per] == [full[:1], full[1:]]


def test_a_template_that_rewrites_earlier_turns_names_the_fix(tokenizer):
    bad = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(TemplateError, match=r"d.jsonl row 3: .*renders conversation prefixes inconsistently.*"
                                            r"data.multiturn=per_turn .*data.loss_on=last_assistant"):
        encode_conversations(tokenizer, [[U1, A3, U2, A3]], "assistant", bad, where=lambda k: "d.jsonl row 3")
    with pytest.raises(TemplateError, match="renders conversation prefixes inconsistently.*data.multiturn"):
        encode_conversations(tokenizer, [[U1, A3]], "last_assistant", bad)  # even the last turn
    dropped = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}<|im_end|>"
               "{% endif %}{% endfor %}")  # earlier replies vanish from the full text
    with pytest.raises(TemplateError, match="moves, repeats or rewrites an assistant reply.*data.multiturn=per_turn"):
        encode_conversations(tokenizer, [[U1, A3, U2, A3]], "assistant", dropped)
    # per_turn does not need the earlier replies: each example supervises its last one
    split, _ = split_per_turn([[U1, A3, U2, A3]])
    assert len(encode_conversations(tokenizer, split, "last_assistant", dropped)) == 2


def test_per_turn_names_the_source_row_of_a_bad_conversation(tmp_path, families):
    tok = families["gemma"]  # gemma refuses two user turns in a row
    rows = [[U1, A3], [U1, A3, U2, U3, A3]]
    with pytest.raises(TemplateError, match=r"d.jsonl row 2: data.chat_template=gemma failed to render it .*alternate"):
        prep(tmp_path, tok, rows, chat_template="gemma", multiturn="per_turn")


def test_multiturn_config(tokenizer):
    with pytest.raises(ConfigError, match="data.multiturn='both' is not one of final, per_turn"):
        typed_cfg("data.multiturn=both")
    for loss_on in ("last_assistant", "all"):
        with pytest.raises(ConfigError, match=f"data.multiturn=per_turn .*data.loss_on={loss_on} contradicts: use "
                                              "data.loss_on=assistant with it, or data.multiturn=final"):
            typed_cfg("data.multiturn=per_turn", f"data.loss_on={loss_on}")
    assert typed_cfg("data.multiturn=per_turn").data.multiturn == "per_turn"
    assert typed_cfg("data.chat_template=qwen2.5").data.chat_template == "qwen2.5"  # a name with a dot composes
    a, b = (cache_key(DataConfig(multiturn=m), tokenizer, "t") for m in ("final", "per_turn"))
    assert a != b  # the rule changes tokens: it is part of the cache key
