"""The token cache (data/store.py + data/prepare.py): plain arrays, mapped not loaded, the same whatever the
process count, never trusted when damaged or half-written, and waited for with a deadline."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import distsft.data.prepare as prepare_mod
from distsft.config import DataConfig
from distsft.data.loader import pack
from distsft.data.prepare import SplitStats, cache_key, cache_root, prepare, wait_for
from distsft.data.sources import DataError
from distsft.data.templates import resolve_template
from tests.unit.test_sources_cache import GOOD, write

ROWS = GOOD * 3  # 120 conversations, 40 distinct


def examples(store):
    return [(store.origin(i), *map(np.ndarray.tolist, store.example(i))) for i in range(len(store))]


def cfg_for(tmp_path, **kw):
    p = tmp_path / "d.jsonl"
    if not p.exists():
        write(p, ROWS)
    return DataConfig(train_files=[str(p)], val_fraction=0.1, cache_dir=str(tmp_path / "cache"), max_seq_len=64, **kw)


def test_entry_is_plain_arrays_and_a_json_index_mapped_by_readers(tmp_path, tokenizer):
    cfg = cfg_for(tmp_path, shard_size=16, num_proc=1)
    first = prepare(cfg, tokenizer)
    entry = cache_root(cfg) / first.fingerprint
    index = json.loads((entry / "index.json").read_text())
    assert len(index["splits"]["train"]["shards"]) == -(-first.train_stats.rows_in // 16)  # one per 16 rows
    for f in entry.glob("*.npy"):
        np.load(f, allow_pickle=False)  # no object arrays anywhere
    assert not list(entry.glob("*.npz")) and not list(entry.glob("*.pkl"))
    again = prepare(cfg, tokenizer)
    assert again.cache_hit and examples(again.train) == examples(first.train)
    assert all(isinstance(t, np.memmap) for t in again.train._tokens)  # mapped, not read into memory
    assert again.train._tokens[0].dtype == np.uint16  # a 640-token vocabulary fits in 2 bytes
    # the packed rows come from the cache and equal packing the lengths again
    cached = again.train.packed[(cfg.max_seq_len, cfg.seed)]
    again.train.packed.clear()
    assert pack(again.train, cfg, SplitStats()).tolist() == cached.tolist()


def test_parallel_preparation_equals_serial(tmp_path, tokenizer):
    serial = prepare(cfg_for(tmp_path, shard_size=7, num_proc=1, cache=False), tokenizer)
    parallel = prepare(cfg_for(tmp_path, shard_size=7, num_proc=2, cache=False), tokenizer)
    balanced = prepare(cfg_for(tmp_path, shard_size=4096, num_proc=2, cache=False), tokenizer)  # shards cut to fit
    assert examples(parallel.train) == examples(serial.train) == examples(balanced.train)
    assert examples(parallel.eval) == examples(serial.eval)
    assert parallel.train_stats == serial.train_stats == balanced.train_stats


def test_shards_are_cut_so_every_worker_gets_several():
    from distsft.data.prepare import shard_size

    assert shard_size(20_000, 4096, 2) == 2500  # 8 shards on 2 workers (4096 would give 5: one worker idles)
    assert shard_size(1_000_000, 4096, 8) == 4096  # large data: data.shard_size bounds memory
    assert shard_size(20_000, 4096, 1) == 4096  # one process: nothing to balance
    assert shard_size(3, 4096, 2) == 1


def test_an_error_in_a_worker_names_file_and_row(tmp_path, tokenizer):
    p = tmp_path / "d.jsonl"
    write(p, GOOD[:30] + [{"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]}])
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
                      "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}")
    cfg = DataConfig(train_files=[str(p)], val_fraction=0, cache_dir=str(tmp_path / "cache"), shard_size=8,
                     num_proc=2, chat_template=str(strict))
    with pytest.raises(DataError, match=rf"{p} row 31: data.chat_template=.*failed to render it .*no boom") as e:
        prepare(cfg, tokenizer)
    assert e.value.reason == "template"  # the kind survives the trip back from the worker process
    root = cache_root(cfg)
    assert [x.name for x in root.iterdir()] == [f"{cache_key(cfg, tokenizer, strict.read_text())}.failed"]


def test_a_damaged_entry_is_rebuilt_never_trusted(tmp_path, tokenizer, caplog):
    cfg = cfg_for(tmp_path, num_proc=1)
    first = prepare(cfg, tokenizer)
    want = examples(first.train)
    entry = cache_root(cfg) / first.fingerprint
    shard = next(entry.glob("train-00000.tokens.npy"))
    shard.write_bytes(shard.read_bytes()[:-10])  # a truncated copy, a full disk
    again = prepare(cfg, tokenizer)
    assert not again.cache_hit and "is damaged" in caplog.text
    assert examples(again.train) == want
    assert prepare(cfg, tokenizer).cache_hit


def test_a_build_that_dies_leaves_nothing_a_reader_trusts(tmp_path, tokenizer, monkeypatch):
    cfg = cfg_for(tmp_path, num_proc=1, shard_size=8)
    calls = {"n": 0}
    real = prepare_mod.write_shard

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed after two shards
        return real(*a, **k)

    monkeypatch.setattr(prepare_mod, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tokenizer)
    root = cache_root(cfg)
    assert not [x for x in root.iterdir() if x.is_dir()]  # no entry, no temporary directory left behind
    monkeypatch.setattr(prepare_mod, "write_shard", real)
    assert not prepare(cfg, tokenizer).cache_hit and prepare(cfg, tokenizer).cache_hit


def test_a_waiting_rank_gets_the_entry_or_a_clear_error(tmp_path, tokenizer):
    cfg = cfg_for(tmp_path, num_proc=1)
    key = cache_key(cfg, tokenizer, resolve_template(None, tokenizer, "t"))
    path = cache_root(cfg) / key
    with pytest.raises(DataError, match=r"waited data.prepare_timeout=1 s for the token cache entry .*python -m "
                                        r"distsft.prepare"):
        wait_for(path, timeout=1, poll=0.05)
    got = {}
    waiter = threading.Thread(target=lambda: got.update(p=prepare(cfg, tokenizer, builder=False)))
    waiter.start()  # a rank that is not its node's first: it waits, then maps what the builder wrote
    time.sleep(0.3)
    built = prepare(cfg, tokenizer)
    waiter.join(30)
    assert got["p"].cache_hit and examples(got["p"].train) == examples(built.train)
    path.with_name(f"{key}x.failed").write_text("node-7 pid 12: DataError: d.jsonl row 3: bad")
    with pytest.raises(DataError, match="first process of this node failed to prepare the data .*row 3: bad"):
        wait_for(path.with_name(f"{key}x"), timeout=30, poll=0.05)
