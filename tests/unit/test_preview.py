"""distsft.preview marks exactly the supervised tokens and prints the dataset statistics."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from tests.conftest import ROOT, typed_cfg


def test_preview_marks_assistant_replies():
    from distsft.preview import preview

    buf = io.StringIO()
    preview(typed_cfg("preview.examples=4"), color=False, stream=buf)
    out = buf.getvalue()
    assert out.count("--- example") == 4
    marked = re.findall(r"\[\[(.*?)\]\]", out.split("--- example", 1)[1], flags=re.S)
    assert marked and all(m.endswith("<|im_end|>") for m in marked)
    assert not any("<|im_start|>" in m or "user" in m for m in marked)  # prompts never supervised
    assert "train: 1140/1140 examples kept" in out and "packing efficiency" in out


def test_preview_cli_reports_bad_config_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distsft.preview", "data.chat_template=nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "distsft: error: data.chat_template=nope" in proc.stderr


def test_prepare_builds_the_cache_ahead_and_later_runs_map_it(tmp_path):
    from distsft.prepare import prepare_main
    from distsft.preview import preview

    overrides = (f"data.cache_dir={tmp_path / 'cache'}", "data.shard_size=300", "data.num_proc=2")
    buf = io.StringIO()
    first = prepare_main(typed_cfg(*overrides), stream=buf)
    assert not first["cache_hit"] and "prepared with 2 process(es)" in buf.getvalue()
    assert "train: 1140/1140 examples kept" in buf.getvalue() and first["path"].startswith(str(tmp_path))
    # 1140 rows in shards of at most 300, cut to 143 so that each of the 2 workers gets 4
    assert len(list((tmp_path / "cache").glob("*/train-*.tokens.npy"))) == 8
    again = io.StringIO()
    assert prepare_main(typed_cfg(*overrides), stream=again)["cache_hit"] and "found in the cache" in again.getvalue()
    out = io.StringIO()
    preview(typed_cfg(*overrides, "data.num_proc=1", "preview.examples=1"), color=False, stream=out)  # not in the key
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_preview_marks_what_each_multiturn_rule_supervises(tmp_path, tokenizer):
    """A Qwen3 conversation with reasoning in an earlier turn previews under both rules, and the marked
    characters are what the rule says: final drops the earlier reasoning (as the template does),
    per_turn makes one example per reply, each with its reasoning."""
    import json

    from distsft.preview import preview
    from tests.chat_families import family_tokenizer

    family_tokenizer(tokenizer, "qwen3").save_pretrained(tmp_path / "tok")  # the tiny tokenizer + Qwen3's tokens
    rows = [{"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                          {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n2 plus 2 is 4."},
                          {"role": "user", "content": "Spell apple backwards."},
                          {"role": "assistant", "content": "<think>Reverse the letters.</think>elppa"}]}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"model.tokenizer={tmp_path / 'tok'}", "data=jsonl", f"data.train_files=[{tmp_path / 'q.jsonl'}]",
              "data.val_fraction=0", "data.chat_template=qwen3", f"data.cache_dir={tmp_path / 'cache'}")
    marked = {}
    for rule in ("final", "per_turn"):
        buf = io.StringIO()
        preview(typed_cfg(*common, f"data.multiturn={rule}", "preview.examples=5"), color=False, stream=buf)
        out = buf.getvalue()
        assert f"multiturn={rule}" in out
        marked[rule] = [re.findall(r"\[\[(.*?)\]\]", ex, flags=re.S) for ex in out.split("--- example")[1:]]
    assert marked["final"] == [["2 plus 2 is 4.<|im_end|>",
                                "<think>\nReverse the letters.\n</think>\n\nelppa<|im_end|>"]]
    assert marked["per_turn"] == [["<think>\nAdd them.\n</think>\n\n2 plus 2 is 4.<|im_end|>"],
                                  ["<think>\nReverse the letters.\n</think>\n\nelppa<|im_end|>"]]


def test_preview_states_the_whole_row_limit_and_each_ranks_slice_under_sequence_parallelism():
    from distsft.preview import preview

    buf = io.StringIO()
    preview(typed_cfg("preview.examples=0", "parallel=zero2", "parallel.sp_size=2", "data.max_seq_len=1000"),
            color=False, stream=buf)
    assert ("rows of up to data.max_seq_len=1,000 tokens (packing, truncation and the over-long policy use it), "
            "each of the 2 ranks of a group holding 500 tokens of every row") in buf.getvalue()
    plain = io.StringIO()
    preview(typed_cfg("preview.examples=0"), color=False, stream=plain)
    assert "sequence parallelism" not in plain.getvalue()


def test_preview_warns_when_the_data_cannot_fill_one_step_and_names_the_fix(tmp_path, monkeypatch):
    """60 short rows with data=jsonl's 2048-token rows pack into 2 sequences: the preview says training would
    stop, as training itself would, with the length that fits; the embedded default (enough rows) does not."""
    from distsft.preview import preview

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    small = tmp_path / "small.jsonl"
    small.write_text("".join((ROOT / "distsft/assets/data/tiny_sft.jsonl").read_text().splitlines(True)[:60]))
    buf = io.StringIO()
    preview(typed_cfg("data=jsonl", f"data.train_files=[{small}]", "experiment=none", "preview.examples=0"),
            color=False, stream=buf)
    assert "warning: training would stop here (1 process): only 2 training sequences" in buf.getvalue()
    assert "Use data.max_seq_len=128" in buf.getvalue()
    buf = io.StringIO()
    preview(typed_cfg("preview.examples=0"), color=False, stream=buf)
    assert "warning" not in buf.getvalue()
