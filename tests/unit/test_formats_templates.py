"""Every row format and template: only assistant replies and their end-of-turn token are supervised."""

from __future__ import annotations

import json

import pytest

from distsft.config import DataConfig
from distsft.data.prepare import prepare
from distsft.data.sources import DataError
from distsft.data.templates import LLAMA3

SYS, Q1, A1, Q2, A2 = "Be brief.", "What is 2 plus 2?", "2 plus 2 is 4.", "Spell apple backwards.", "elppa"
ROWS = {
    "messages": {"messages": [{"role": "system", "content": SYS}, {"role": "user", "content": Q1},
                              {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                              {"role": "assistant", "content": A2}]},
    "sharegpt": {"conversations": [{"from": "system", "value": SYS}, {"from": "human", "value": Q1},
                                   {"from": "gpt", "value": A1}, {"from": "human", "value": Q2},
                                   {"from": "gpt", "value": A2}]},
    "alpaca": {"instruction": Q1, "input": "", "output": A1},
    "prompt_completion": {"prompt": Q1, "completion": A1},
    "prompt_completion_chat": {"prompt": [{"role": "system", "content": SYS}, {"role": "user", "content": Q1}],
                               "completion": [{"role": "assistant", "content": A1}]},
    "instruction_completion": {"instruction": Q1, "response": A1},
}
REPLIES = {"messages": [A1, A2], "sharegpt": [A1, A2]}


def prep(tmp_path, tokenizer, rows, **kw):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False, **kw), tokenizer)


def supervised(tokenizer, store, i=0):
    ids, labels = store.example(i)
    return tokenizer.decode([t for t, y in zip(ids, labels) if y != -100])


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("template,eot", [(None, "<|im_end|>"), ("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_every_format_and_template_masks_assistant_only(tmp_path, tokenizer, fmt, template, eot):
    store = prep(tmp_path, tokenizer, [ROWS[fmt]] * 2, chat_template=template).train
    want = "".join(r + eot for r in REPLIES.get(fmt, [A1]))
    assert supervised(tokenizer, store) == want
    text = tokenizer.decode(store.example(0)[0])
    assert Q1 in text and (SYS in text) == (fmt in ("messages", "sharegpt", "prompt_completion_chat"))


def test_jinja_file_template_without_generation_markers(tmp_path, tokenizer):
    j = tmp_path / "plain.jinja"
    j.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    store = prep(tmp_path, tokenizer, [ROWS["messages"]], chat_template=str(j)).train
    assert supervised(tokenizer, store).replace(" ", "") == (A1 + "<|im_end|>" + A2 + "<|im_end|>").replace(" ", "")
    assert "{% generation %}" not in j.read_text()


def test_llama3_template_trims_but_masks(tmp_path, tokenizer):
    assert "trim" in LLAMA3
    row = {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": "  " + A1 + "\n"}]}
    assert supervised(tokenizer, prep(tmp_path, tokenizer, [row], chat_template="llama3").train) == A1 + "<|eot_id|>"


def test_loss_on_last_assistant(tmp_path, tokenizer):
    store = prep(tmp_path, tokenizer, [ROWS["messages"]], loss_on="last_assistant").train
    assert supervised(tokenizer, store) == A2 + "<|im_end|>"


def test_bad_template_choices(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data.chat_template=nope.txt: expected null, chatml, llama3, .*qwen3, .* "
                                        "or an existing .jinja"):
        prep(tmp_path, tokenizer, [ROWS["messages"]], chat_template="nope.txt")
    j = tmp_path / "moves.jinja"  # renders the reply somewhere else than after the generation prompt
    j.write_text("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}<|im_end|>{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
                 "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(DataError, match=r"d.jsonl row 1: data.chat_template=.*moves.jinja"):
        prep(tmp_path, tokenizer, [ROWS["messages"]], chat_template=str(j))
