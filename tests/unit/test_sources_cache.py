"""Bad-row skip policy and report, mixing by weight, dedup, length filter, and the tokenization cache."""

from __future__ import annotations

import json

import pytest

import distsft.data.prepare as prepare_mod
from distsft.config import DataConfig
from distsft.data.prepare import prepare
from distsft.data.sources import DataError

GOOD = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} " * (i % 7 + 1)}]}
        for i in range(40)]
BAD = {
    "invalid_json": '{"messages": [',
    "missing_field": {"prompt": "only a prompt"},
    "not_string": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
    "unknown_role": {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
    "empty_conversation": {"messages": []},
    "no_assistant": {"messages": [{"role": "user", "content": "x"}]},
}


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_skip_policy_counts_every_reason(tmp_path, tokenizer):
    rows = GOOD[:5] + list(BAD.values()) + GOOD[5:8]
    p = write(tmp_path / "mixed.jsonl", rows)
    prep = prepare(DataConfig(train_files=[str(p)], val_fraction=0, bad_rows="skip", cache=False), tokenizer)
    assert prep.skipped.counts() == {k: 1 for k in BAD}
    assert sorted(r["row"] for r in prep.skipped.rows) == list(range(6, 12))  # line numbers of the bad rows
    assert all(r["file"] == str(p) and str(p) in r["message"] for r in prep.skipped.rows)
    assert prep.train_stats.kept == 8
    with pytest.raises(DataError, match=r"mixed.jsonl line 6: not valid JSON"):
        prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False), tokenizer)


def test_skip_report_in_run_dir(tmp_path):
    from tests.conftest import run_tiny

    data = write(tmp_path / "d.jsonl", GOOD * 2 + [BAD["unknown_role"], BAD["no_assistant"]])
    res = run_tiny(tmp_path / "run", f"data.train_files=[{data}]", "data.bad_rows=skip", "trainer.max_steps=2",
                   "trainer.eval_every=0")
    report = [json.loads(x) for x in (tmp_path / "run" / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in report] == [(81, "unknown_role"), (82, "no_assistant")]
    assert res.summary["data"]["skipped_rows"] == {"unknown_role": 1, "no_assistant": 1}


def test_mixing_fraction_and_count_and_no_eval_leak(tmp_path, tokenizer):
    a = write(tmp_path / "a.jsonl", GOOD[:20])
    b = write(tmp_path / "b.jsonl", GOOD[20:])
    cfg = DataConfig(train_files=[str(a), str(b)], train_weights=[0.5, 50], val_fraction=0.1, cache=False,
                     mode="pad")
    prep = prepare(cfg, tokenizer)
    origin = [prep.train.origin(i) for i in range(len(prep.train))]
    assert sum(o.startswith(str(a)) for o in origin) == 9  # half of a's 18 train rows
    assert sum(o.startswith(str(b)) for o in origin) == 50  # b's 18 train rows repeated up to 50
    evals = {prep.eval.origin(i) for i in range(len(prep.eval))}
    assert len(evals) == 4 and not evals & set(origin)  # eval split before weighting: no leak
    with pytest.raises(DataError, match=r"data.train_weights\[0\]=2.5"):
        prepare(DataConfig(train_files=[str(a)], train_weights=[2.5], cache=False), tokenizer)
    with pytest.raises(DataError, match="data.train_weights has 1 entries for 2"):
        prepare(DataConfig(train_files=[str(a), str(b)], train_weights=[1], cache=False), tokenizer)


def test_dedup_and_min_tokens(tmp_path, tokenizer):
    p = write(tmp_path / "d.jsonl", GOOD[:10] + GOOD[:4])
    prep = prepare(DataConfig(train_files=[str(p)], val_fraction=0, dedup=True, cache=False), tokenizer)
    assert (prep.train_stats.duplicates, prep.train_stats.kept) == (4, 10)
    lengths = sorted(prep.train.lengths)
    short = prepare(DataConfig(train_files=[str(p)], val_fraction=0, dedup=True, cache=False,
                               min_tokens=int(lengths[3])), tokenizer)
    assert short.train_stats.dropped_short == sum(n < lengths[3] for n in lengths) > 0


def examples(store):
    return [tuple(map(tuple, store.example(i))) for i in range(len(store))]


def test_cache_hit_and_invalidation(tmp_path, tokenizer, monkeypatch):
    calls = {"n": 0}
    real = prepare_mod.encode_conversations

    def counting(tok, convs, *a, **k):
        calls["n"] += len(convs)
        return real(tok, convs, *a, **k)

    monkeypatch.setattr(prepare_mod, "encode_conversations", counting)
    p = write(tmp_path / "d.jsonl", GOOD)
    cfg = DataConfig(train_files=[str(p)], val_fraction=0.1, cache_dir=str(tmp_path / "cache"), num_proc=1)
    first = prepare(cfg, tokenizer)
    assert not first.cache_hit and calls["n"] == 40
    second = prepare(cfg, tokenizer)
    assert second.cache_hit and calls["n"] == 40  # nothing tokenized again
    assert examples(second.train) == examples(first.train) and second.train_stats == first.train_stats
    assert [second.eval.origin(i) for i in range(4)] == [first.eval.origin(i) for i in range(4)]
    write(p, GOOD[:-1] + [GOOD[0]])  # same size, other content
    assert not prepare(cfg, tokenizer).cache_hit and calls["n"] == 80
    cfg.chat_template = "llama3"
    assert not prepare(cfg, tokenizer).cache_hit and calls["n"] == 120
    assert len(list((tmp_path / "cache").iterdir())) == 3 and not list((tmp_path / "cache").glob("*.tmp*"))
