"""Bad-row skip policy and report, mixing by weight, dedup, length filter, and the tokenization cache."""

from __future__ import annotations

import json
import logging

import pytest

import distsft.data.cachekey as cachekey
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


def test_cache_key_records_the_versions_that_shape_tokens(tmp_path, tokenizer, monkeypatch):
    p = write(tmp_path / "d.jsonl", GOOD[:12])
    cfg = DataConfig(train_files=[str(p)], val_fraction=0, cache_dir=str(tmp_path / "cache"), num_proc=1)
    first = prepare(cfg, tokenizer)
    assert prepare(cfg, tokenizer).cache_hit
    index = json.loads((prepare_mod.cache_root(cfg) / first.fingerprint / "index.json").read_text())
    assert index["versions"] == prepare_mod.token_versions()
    assert set(index["versions"]) == {"cache_format", "distsft", "transformers", "tokenizers", "jinja2"}
    real = cachekey.version
    for pkg in ("distsft", "transformers", "tokenizers", "jinja2"):  # another version of any of them: a miss
        monkeypatch.setattr(cachekey, "version", lambda name, pkg=pkg: "999.0" if name == pkg else real(name))
        assert not prepare(cfg, tokenizer).cache_hit, pkg
        assert prepare(cfg, tokenizer).cache_hit
    monkeypatch.setattr(cachekey, "version", real)
    assert prepare(cfg, tokenizer).fingerprint == first.fingerprint  # the installed versions: the first entry
    monkeypatch.setattr(cachekey, "CACHE_VERSION", cachekey.CACHE_VERSION + 1)
    assert not prepare(cfg, tokenizer).cache_hit


def test_hub_names_and_revisions():
    from distsft.data.sources import hub_dataset

    assert hub_dataset("owner/chat") == ("owner/chat", None)
    assert hub_dataset("owner/chat.v2@refs/pr/3") == ("owner/chat.v2", "refs/pr/3")
    assert hub_dataset("squad@main") == ("squad", "main")
    for local in ("data/train.jsonl", "./data/train", "/data/train", "a/b/c", "x.parquet"):
        assert hub_dataset(local) is None, local  # local paths, found or not, never go to the Hub


@pytest.fixture
def fake_hub(monkeypatch):
    """A hub dataset ``owner/chat`` whose branches point at commits the test moves; records the loads."""
    import datasets

    import distsft.data.sources as sources
    import distsft.hub

    hub = {"commits": {None: "a" * 40}, "asked": [], "loaded": []}

    def ask(repo, revision):
        hub["asked"].append((repo, revision))
        if hub["commits"] is None:
            raise ConnectionError("offline")
        return hub["commits"][revision]

    real = datasets.load_dataset

    def load(path, *a, revision=None, **k):
        if path == "owner/missing":
            raise FileNotFoundError("Dataset 'owner/missing' doesn't exist on the Hub")
        if path != "owner/chat":
            return real(path, *a, revision=revision, **k)
        hub["loaded"].append(revision)
        return datasets.Dataset.from_list(GOOD[:12])

    monkeypatch.setattr(sources, "_ask_hub", ask)
    monkeypatch.setattr(distsft.hub, "unreachable", lambda kind="model": None)  # this fake Hub always answers
    monkeypatch.setattr(datasets, "load_dataset", load)
    return hub


def test_a_hub_dataset_is_keyed_and_loaded_by_its_commit(tmp_path, tokenizer, fake_hub, caplog):
    cfg = DataConfig(train_files=["owner/chat"], val_fraction=0, cache_dir=str(tmp_path / "cache"), num_proc=1)
    first = prepare(cfg, tokenizer)
    assert not first.cache_hit and fake_hub["loaded"] == ["a" * 40]  # loaded at the commit the key records
    assert first.train.origin(0) == "owner/chat row 1"
    assert prepare(cfg, tokenizer).cache_hit
    fake_hub["commits"][None] = "b" * 40  # a new commit on the default branch: the cache must not serve the old
    assert not prepare(cfg, tokenizer).cache_hit and fake_hub["loaded"][-1] == "b" * 40
    fake_hub["asked"].clear()
    cfg.train_files = [f"owner/chat@{'c' * 40}"]  # pinned to a commit: nothing to ask
    assert not prepare(cfg, tokenizer).cache_hit and fake_hub["loaded"][-1] == "c" * 40 and not fake_hub["asked"]
    fake_hub["commits"] = None  # offline: keyed by name and revision, loaded as named, and said so
    cfg.train_files = ["owner/chat@v1"]
    assert not prepare(cfg, tokenizer).cache_hit and fake_hub["loaded"][-1] == "v1"
    assert "hub dataset owner/chat@v1: could not ask the Hub which commit v1 is (ConnectionError: offline)" \
        in caplog.text and "owner/chat@<commit>" in caplog.text
    with pytest.raises(DataError, match=r"owner/missing: not a local file or directory, and it could not be loaded as "
                                        r"a hub dataset \(FileNotFoundError: Dataset 'owner/missing' doesn't exist"):
        prepare(DataConfig(train_files=["owner/missing"], cache=False), tokenizer)
    with pytest.raises(DataError, match=r"a/b/c: not found \(data files are .*hub dataset name owner/name"):
        prepare(DataConfig(train_files=["a/b/c"], cache=False), tokenizer)


def test_a_template_that_reads_the_date_is_warned_about(tmp_path, tokenizer, caplog):
    p = write(tmp_path / "d.jsonl", GOOD[:6])
    dated = tmp_path / "dated.jinja"
    dated.write_text("{{ 'Today: ' + strftime_now('%d %b %Y') + '\\n' }}{% for m in messages %}{{ m['role'] }}: "
                     "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    plain = tmp_path / "plain.jinja"
    plain.write_text(dated.read_text().replace("strftime_now('%d %b %Y')", "'01 Jan 2025'"))
    cfg = DataConfig(train_files=[str(p)], val_fraction=0, cache=False, num_proc=1, chat_template=str(plain))
    prepare(cfg, tokenizer)
    assert "strftime_now" not in caplog.text
    cfg.chat_template = str(dated)
    prepare(cfg, tokenizer)
    warned = [r for r in caplog.records if "strftime_now" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"  # once, not per conversation
    assert f"data.chat_template={dated} reads today's date" in warned[0].getMessage()
    assert "serves the tokens of the day its entry was built" in warned[0].getMessage()


def test_rows_kept_per_file_are_logged_and_a_row_count_weight_is_warned_about(tmp_path, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="distsft.data.sources")
    a = write(tmp_path / "a.jsonl", GOOD[:20])
    b = write(tmp_path / "b.jsonl", GOOD[20:])
    cfg = DataConfig(train_files=[str(a), str(b)], train_weights=[2, 0.5], val_fraction=0.1, num_proc=1,
                     cache_dir=str(tmp_path / "cache"))
    for hit in (False, True):  # a cache hit says it too
        caplog.clear()
        prep = prepare(cfg, tokenizer)
        assert prep.cache_hit == hit
        info = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "rows read" in r.getMessage()]
        assert info == [f"data.train_files[0] {a}: 20 rows read -> 2 kept (2 held out for eval; "
                        "data.train_weights[0]=2)",
                        f"data.train_files[1] {b}: 20 rows read -> 9 kept (2 held out for eval; "
                        "data.train_weights[1]=0.5)"]
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warned == [f"data.train_weights[0]=2 keeps 2 of the 18 training rows of {a}: a whole number > 1 is a "
                          "row count, not a multiplier (2 and 2.0 alike: the config holds floats); a fraction in "
                          "(0, 1] takes that share of the rows, and N copies of the file are N times its row count "
                          "(36 for two)"]
    assert [(s["read"], s["eval"], s["kept"]) for s in prep.sources] == [(20, 2, 2), (20, 2, 9)]
    caplog.clear()  # fractions, 1.0, and counts of at least the file's rows: nothing to warn about
    prepare(DataConfig(train_files=[str(a), str(b)], train_weights=[0.25, 1.0], val_fraction=0, cache=False,
                       num_proc=1), tokenizer)
    prepare(DataConfig(train_files=[str(a), str(b)], train_weights=[20.0, 50], val_fraction=0, cache=False,
                       num_proc=1), tokenizer)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    caplog.clear()  # without weights: rows read -> kept, and duplicates are counted per file
    prepare(DataConfig(train_files=[str(a), str(a)], val_fraction=0, dedup=True, cache=False, num_proc=1), tokenizer)
    assert f"data.train_files[1] {a}: 20 rows read -> 0 kept (20 duplicates dropped)" in caplog.text
