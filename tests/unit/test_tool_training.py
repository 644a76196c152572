"""Tool-calling rows end to end: the embedded tiny model trains on a file that mixes plain rows and
tool-calling ones (one process, CPU), and ``python -m distsft.preview`` marks what a tool row supervises."""

from __future__ import annotations

import math
import re
import subprocess
import sys

from tests.chat_families import TEMPLATES
from tests.conftest import ROOT, run_tiny
from tests.unit.test_tool_families import FIXTURE

QWEN25 = TEMPLATES / "qwen2.5.jinja"  # the embedded tokenizer has its ChatML tokens


def mixed_file(tmp_path):
    plain = (ROOT / "distsft" / "assets" / "data" / "tiny_sft.jsonl").read_text().splitlines()[:60]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(plain) + "\n" + FIXTURE.read_text() * 4)  # 60 plain rows, 16 tool-calling rows
    return path


def test_the_tiny_model_trains_on_plain_and_tool_calling_rows(tmp_path):
    data = mixed_file(tmp_path)
    res = run_tiny(tmp_path / "run", f"data.train_files=[{data}]", f"data.chat_template={QWEN25}",
                   "data.max_seq_len=1024", "data.val_fraction=0", "trainer.max_steps=4", "trainer.eval_every=0",
                   "logging.sample_every=0")
    s = res.summary
    assert s["status"] == "finished" and s["steps"] == 4
    assert s["data"]["train"]["tool_rows"] == 16 and s["data"]["train"]["kept"] == 76
    assert all(math.isfinite(loss) for _, loss in s["train_loss_history"])


def test_the_preview_cli_marks_a_tool_calling_rows_supervised_spans(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distsft.preview", f"data.train_files=[{FIXTURE}]",
                           f"data.chat_template={QWEN25}", "data.max_seq_len=1024", "data.val_fraction=0",
                           "preview.examples=4", f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    first = out.split("--- example 0", 1)[1].split("--- example", 1)[0]
    marked = re.findall(r"\[\[(.*?)\]\]", first, flags=re.DOTALL)
    calls = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
    assert marked == [calls, "It is 22 C and sunny in Paris, and the time is 14:05.<|im_end|>"]
    assert "<tool_response>\n22 C, sunny\n</tool_response>" in first  # shown, not marked
    assert "4 rows with tool calls, 2 turns with reasoning" in out and "train_on_reasoning=true" in out
