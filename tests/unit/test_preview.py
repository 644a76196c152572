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
    from distsft.preview import preview
    from distsft.prepare import prepare_main

    overrides = (f"data.cache_dir={tmp_path / 'cache'}", "data.shard_size=300", "data.num_proc=2")
    buf = io.StringIO()
    first = prepare_main(typed_cfg(*overrides), stream=buf)
    assert not first["cache_hit"] and "prepared with 2 process(es)" in buf.getvalue()
    assert "train: 1140/1140 examples kept" in buf.getvalue() and first["path"].startswith(str(tmp_path))
    assert len(list((tmp_path / "cache").glob("*/train-*.tokens.npy"))) == 4  # 1140 rows in shards of 300
    again = io.StringIO()
    assert prepare_main(typed_cfg(*overrides), stream=again)["cache_hit"] and "found in the cache" in again.getvalue()
    out = io.StringIO()
    preview(typed_cfg(*overrides, "data.num_proc=1", "preview.examples=1"), color=False, stream=out)  # not in the key
    assert len(list((tmp_path / "cache").iterdir())) == 1
