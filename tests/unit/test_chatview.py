"""Reasoning traces (distsft/data/chatview.py): rendered as each family's template does (Qwen3 reads
reasoning_content; the others get it written into the reply as a <think> block, with a warning), and
supervised or not by data.train_on_reasoning, through packing, the cache key and the preview."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

from distsft.config import ConfigError, DataConfig
from distsft.data.cachekey import cache_key
from distsft.data.chatview import reasoning_mode
from distsft.data.collate import collate_packed
from distsft.data.loader import pack
from distsft.data.prepare import prepare
from distsft.data.templates import BUILTIN
from distsft.data.tokenize import IGNORE
from tests.chat_families import TEMPLATES, family_tokenizer
from tests.conftest import typed_cfg
from tests.unit.test_multiturn import supervised_runs
from tests.unit.test_tool_families import FIXTURE, REPLY, ROWS, qwen_calls

WHY = "11 C with wind feels cold."


@pytest.fixture(scope="module")
def qwen(tokenizer):
    return family_tokenizer(tokenizer, "qwen3")


def prep(tmp_path, tok, rows, template, **kw):
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False, max_seq_len=4096,
                              chat_template=template, **kw), tok, "the family tokenizer")


def runs(tok, store, i=0):
    ids, labels = store.example(i)
    return supervised_runs(tok, ids, labels)


@pytest.mark.parametrize("template,mode", [("qwen3.jinja", "field"), ("qwen2.5.jinja", "content"),
                                           ("llama3.1.jinja", "content"), ("mistral_nemo.jinja", "content"),
                                           ("qwen3", "content")])
def test_the_probe_finds_whether_a_template_renders_reasoning(qwen, template, mode):
    source = BUILTIN[template].source if template in BUILTIN else (TEMPLATES / template).read_text()
    def render(m):
        return qwen.apply_chat_template(m, chat_template=source, tokenize=False)

    assert reasoning_mode(render, ("test", template)) == mode


@pytest.mark.parametrize("template", ["qwen3.jinja", "qwen2.5.jinja"])
def test_train_on_reasoning_false_leaves_the_reasoning_text_out(tmp_path, qwen, template):
    """Qwen3 renders the field in its <think> block, Qwen2.5 gets the same block written into the reply:
    either way, false supervises the tags and the reply, not the reasoning between them."""
    path = str(TEMPLATES / template)
    on = prep(tmp_path, qwen, [ROWS[2]], path)
    assert runs(qwen, on.train)[-1] == f"<think>\n{WHY}\n</think>\n\n{REPLY[3]}<|im_end|>"
    off = prep(tmp_path, qwen, [ROWS[2]], path, train_on_reasoning=False)
    assert runs(qwen, off.train) == [qwen_calls(3, "") + "<|im_end|>", "<think>\n",
                                     f"\n</think>\n\n{REPLY[3]}<|im_end|>"]
    assert np.array_equal(off.train.example(0)[0], on.train.example(0)[0])  # the same tokens, another mask
    assert off.train_stats.supervised_tokens < on.train_stats.supervised_tokens


def test_reasoning_before_a_call_and_inline_think_blocks_follow_the_setting(tmp_path, qwen):
    off = prep(tmp_path, qwen, [ROWS[3]], str(TEMPLATES / "qwen3.jinja"), train_on_reasoning=False)
    assert runs(qwen, off.train)[:2] == ["<think>\n", "\n</think>\n\n" + qwen_calls(4, "") + "<|im_end|>"]
    inline = [{"role": "user", "content": "2 plus 2?"}, {"role": "assistant", "content": "<think>Add.</think>4."}]
    off = prep(tmp_path, qwen, [{"messages": inline}], "qwen3", train_on_reasoning=False)
    assert runs(qwen, off.train) == ["<think>\n", "\n</think>\n\n4.<|im_end|>"]


def test_a_template_that_ignores_reasoning_gets_it_in_the_reply_with_a_warning(tmp_path, qwen, caplog):
    with caplog.at_level(logging.WARNING, logger="distsft.data.prepare"):
        data = prep(tmp_path, qwen, ROWS[1:3], str(TEMPLATES / "qwen2.5.jinja"))
    assert data.train_stats.reasoning_turns == 1
    warned = [r.getMessage() for r in caplog.records if "reasoning_content" in r.getMessage()]
    assert len(warned) == 1 and "qwen2.5.jinja does not render reasoning_content: the reasoning of 1 assistant " \
                                 "turns is written into the reply as <think>" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distsft.data.prepare"):
        prep(tmp_path, qwen, ROWS[1:3], str(TEMPLATES / "qwen3.jinja"))
    assert not [r for r in caplog.records if "reasoning_content" in r.getMessage()]


def test_packing_keeps_each_documents_reasoning_mask(tmp_path, qwen):
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(FIXTURE.read_text() + json.dumps(plain) + "\n")
    cfg = DataConfig(train_files=[str(mixed)], val_fraction=0, cache=False, max_seq_len=4096,
                     chat_template=str(TEMPLATES / "qwen3.jinja"), train_on_reasoning=False)
    data = prepare(cfg, qwen)
    rows = pack(data.train, cfg, data.train_stats)
    assert len(rows) == 1 and data.train_stats.examples_per_sequence == 5  # all five rows in one sequence
    batch = collate_packed(data.train, [list(rows[0])], qwen.pad_token_id or 0)
    ids, labels, pos = (batch[k][0].numpy() for k in ("input_ids", "labels", "position_ids"))
    at = 0
    for i in rows[0]:
        x, y = data.train.example(i)
        assert np.array_equal(ids[at:at + len(x)], x) and np.array_equal(labels[at:at + len(x)], y)
        assert pos[at] == 0 and labels[at] == IGNORE
        at += len(x)
    supervised = qwen.decode(ids[labels != IGNORE])
    assert WHY not in supervised and "I need the time tool." not in supervised
    assert REPLY[3] in supervised and "hello<|im_end|>" in supervised


def test_the_setting_is_in_the_cache_key_the_config_checks_and_the_preview(tmp_path, tokenizer):
    assert cache_key(DataConfig(), tokenizer, "t") != cache_key(DataConfig(train_on_reasoning=False), tokenizer, "t")
    with pytest.raises(ConfigError, match="data.train_on_reasoning=false takes the reasoning out of the assistant "
                                          "turns, which data.loss_on=all supervises"):
        typed_cfg("data.train_on_reasoning=false", "data.loss_on=all")
    from distsft.preview import preview

    buf = io.StringIO()
    preview(typed_cfg("preview.examples=1", "data.train_on_reasoning=false"), color=False, stream=buf)
    assert "train_on_reasoning=false" in buf.getvalue().splitlines()[0]
