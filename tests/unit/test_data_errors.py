"""Bad rows are reported with file, row/line and field; the run stops before writing anything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distsft.config import DataConfig
from distsft.data.prepare import prepare
from distsft.data.sources import DataError
from tests.conftest import ROOT

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("bad,expect", [
    ('{"messages": [', r"line 3: not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
     r"row 3: field 'messages\[1\].role' is 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["x"]}]},
     r"row 3: field 'messages\[1\].content' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]},
     r"row 3: field 'messages' has no assistant turn"),
    ({"messages": []}, r"row 3: field 'messages' must be a non-empty list"),
])
def test_bad_messages_rows(tmp_path, tokenizer, bad, expect):
    p = write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError, match=expect) as e:
        prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False), tokenizer)
    assert str(p) in str(e.value)


def test_bad_alpaca_row(tmp_path, tokenizer):
    # a type that changes between rows: Arrow cannot read the file, the line-by-line path names the row
    p = write(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "a", "input": "c", "output": 5}])
    with pytest.raises(DataError, match=r"d.jsonl row 2: field 'output' must be a string, got int"):
        prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False), tokenizer)
    p = write(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}])
    with pytest.raises(DataError, match=r"d.jsonl row 2: field 'output' is missing"):
        prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False), tokenizer)


def test_alpaca_rows_are_formatted(tmp_path, tokenizer):
    p = write(tmp_path, [{"instruction": "Add", "input": "2 2", "output": "4"}] * 3)
    store = prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False), tokenizer).train
    ids, labels = store.example(0)
    assert tokenizer.decode(ids) == "<|im_start|>user\nAdd\n\n2 2<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert tokenizer.decode([t for t, y in zip(ids, labels) if y != -100]) == "4<|im_end|>"


def test_unknown_format_and_missing_file(tmp_path, tokenizer):
    p = write(tmp_path, [{"question": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"cannot detect the data format from columns \['answer', 'question'\]"):
        prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False), tokenizer)
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        prepare(DataConfig(train_files=[str(tmp_path / "nope.jsonl")], val_fraction=0, cache=False), tokenizer)


def test_overlong_examples_are_dropped_and_counted(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "apple " * 200}, {"role": "assistant", "content": "ok"}]}
    p = write(tmp_path, [GOOD, long, GOOD])
    cfg = DataConfig(train_files=[str(p)], val_fraction=0, max_seq_len=64, cache=False)
    stats = prepare(cfg, tokenizer).train_stats
    assert (stats.kept, stats.dropped_overlong) == (2, 1)


def test_cli_bad_row_exits_cleanly_and_writes_nothing(tmp_path):
    p = write(tmp_path, [GOOD, '{"messages": ['])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "distsft.train", f"data.train_files=[{p}]", f"output_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"distsft: error: {p} line 2: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_invalid_utf8_is_named_by_file_and_line_and_can_be_skipped(tmp_path, tokenizer):
    p = tmp_path / "d.jsonl"
    good = json.dumps(GOOD).encode()
    p.write_bytes(b"\n".join([good, good, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', good]) + b"\n")
    with pytest.raises(DataError, match=rf"{p} line 3: not valid UTF-8 \(byte 0xe9 at column"):
        prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False), tokenizer)
    prep = prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False, bad_rows="skip"), tokenizer)
    assert len(prep.train) == 3 and prep.skipped.counts() == {"invalid_utf8": 1}
    assert prep.skipped.rows[0]["row"] == 3


def test_pretty_printed_jsonl_is_refused_with_the_fix(tmp_path, tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(GOOD, indent=2) + "\n" for _ in range(5)))
    with pytest.raises(DataError,
                       match=rf"{p}: 5 JSON objects on \d+ non-empty lines.*one JSON object per line.*jq -c"):
        prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False, bad_rows="skip"), tokenizer)


def test_all_rows_skipped_is_reported_as_empty_with_the_counts(tmp_path, tokenizer):
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    p = write(tmp_path, [bad] * 4)
    with pytest.raises(DataError, match=r"no usable training examples .* 4 bad rows skipped \{'no_assistant': 4\}"):
        prepare(DataConfig(train_files=[str(p)], val_fraction=0, cache=False, bad_rows="skip"), tokenizer)


def test_too_little_data_for_one_step_says_exactly_what_to_change(tmp_path, tokenizer):
    """360 short rows packed into 2048-token sequences fill fewer sequences than one step needs: the message
    names data.max_seq_len (with a length that fits the data) and data.mode=pad, not only the batch size."""
    from distsft.batch import BatchPlan
    from distsft.data.loader import StepLoader, pack

    p = write(tmp_path, [GOOD] * 60)
    cfg = DataConfig(train_files=[str(p)], val_fraction=0, cache=False, max_seq_len=2048)
    prep = prepare(cfg, tokenizer)
    with pytest.raises(DataError, match=r"only 1 training sequences, but one optimizer step needs "
                                        r"trainer.global_batch_size=8 .* Use data.max_seq_len=32 \(at least \d+ "
                                        r"sequences\), or data.mode=pad \(one example per sequence: 60\)"):
        StepLoader(prep.train, pack(prep.train, cfg, prep.train_stats), BatchPlan(4, 2, 1, 8), 0, cfg, 0)
