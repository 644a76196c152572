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
