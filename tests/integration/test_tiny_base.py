"""The embedded pretrained base (model=tiny_base): LoRA on it is a real fine-tune — eval loss falls clearly
below the base's own and the diagnosis says it learned — and the exported adapter loads with plain
PeftModel.from_pretrained from another directory, its base found by the absolute path it records."""

from __future__ import annotations

import json
import os

from tests.conftest import run_tiny

COMMON = ["model=tiny_base", "peft=lora", "trainer.max_steps=40", "trainer.eval_every=40", "trainer.save_every=0",
          "logging.sample_every=0", "logging.plot=false"]


def test_lora_on_the_pretrained_tiny_base_learns_and_its_adapter_loads_anywhere(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = run_tiny(tmp_path / "lr0", *COMMON, "optim.lr=0").summary["final_eval_loss"]  # the base's eval loss
    s = run_tiny(tmp_path / "lora", *COMMON).summary
    assert s["final_eval_loss"] < base - 0.1, (base, s["final_eval_loss"])
    assert s["diagnosis"]["verdict"] != "barely learning" and s["diagnosis"]["fell"] > 0.3

    final = tmp_path / "lora" / "final"
    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base_path) and os.path.isfile(os.path.join(base_path, "model.safetensors"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(final))
    finally:
        os.chdir(cwd)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == s["parameters"]["trainable"]


def test_peft_on_a_random_base_says_it_cannot_learn_much(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="distsft"):
        run_tiny(tmp_path, "peft=lora", "trainer.max_steps=1", "trainer.eval_every=0", "export.enabled=false")
    assert "on a randomly initialised base (model.init=config)" in caplog.text and "model=tiny_base" in caplog.text


def test_a_relative_local_model_path_is_recorded_absolute(tmp_path, monkeypatch):
    from distsft.model.load import located

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert located("m") == str(tmp_path / "m") and located("org/hub-model") == "org/hub-model"
