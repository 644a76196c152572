"""export.py's end-of-turn ids and export_check's verdicts, without a training run."""

from __future__ import annotations

import json

import pytest
from transformers import GenerationConfig

from distsft.export import stop_at_end_of_turn, stop_ids
from distsft.export_check import likely_cause
from tests.conftest import typed_cfg


@pytest.mark.parametrize("base,eot,want", [
    (2, 6, [2, 6]),  # a base eos and another end of turn: both stop
    ([128001, 128008], 128009, [128001, 128008, 128009]),  # a list already: the end of turn appended
    ([2, 6], 6, [2, 6]),  # already there: unchanged
    (2, 2, [2]),  # the end of turn is the eos (the tiny model under its own template)
    (None, 6, [2, 6]),  # none in the generation config: the config's (2)
])
def test_stop_ids(tiny_model, base, eot, want):
    tiny_model.generation_config.eos_token_id = base
    assert stop_ids(tiny_model, eot) == want


def test_generation_config_and_config_json_carry_the_end_of_turn(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    stop_at_end_of_turn(tmp_path, tiny_model, 6)
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [2, 6]
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == [2, 6]
    adapter = tmp_path / "adapter"  # no config.json: the generation config alone
    stop_at_end_of_turn(adapter, tiny_model, 6)
    assert GenerationConfig.from_pretrained(adapter).eos_token_id == [2, 6]
    assert not (adapter / "config.json").exists()


def test_likely_cause_names_the_merge_error():
    assert likely_cause(typed_cfg("peft=qlora")).startswith("QLoRA dequantisation")
    assert likely_cause(typed_cfg("peft=lora", "model.dtype=bfloat16")).startswith("bf16 rounding of W+ΔW")
    assert "differs" in likely_cause(typed_cfg("peft=lora"))
