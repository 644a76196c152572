"""What final/ holds: the fp32 masters on every strategy, a generation config that stops at the template's end of
turn, and a merged export scored again against the trained model.

Masters: under bf16 DeepSpeed's engine computes with bf16 module weights and keeps the fp32 masters in its
optimizer; the export must be the masters (cast to model.dtype), bitwise, as ddp's and FSDP2's are. Each run
checkpoints its last step, and final/ is compared with what that checkpoint holds. model.dtype=float32 on
DeepSpeed: a bf16 export would round the masters and differ (a bf16 model.dtype hides it, since the engine's
weights are the masters rounded to bf16).

End of turn: the tiny tokenizer's eos is ``<|im_end|>`` (id 2, also the config's and generation config's eos);
under ``data.chat_template=llama3`` a turn ends with ``<|eot_id|>`` (id 6). Greedy generation is steered (a
logits processor) to say no eos until it is made to say ``<|eot_id|>`` at the 4th new token: it must stop there,
and the negative control (the base's eos ids, as exported before) runs on to max_new_tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LogitsProcessor

from tests.conftest import checkpoint_masters, launch, run_tiny

BASE_EOS, EOT = 2, 6  # <|im_end|> (the tiny tokenizer's eos), <|eot_id|> (llama3's end of turn)
BF16 = ["trainer.precision=bf16", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0",
        "logging.sample_every=0", "logging.plot=false", "data.chat_template=llama3"]


def newest_checkpoint(out: Path) -> Path:
    return max((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))


def assert_final_is_the_masters(out: Path, dtype: torch.dtype, adapter: bool = False) -> None:
    masters = checkpoint_masters(newest_checkpoint(out))
    if adapter:  # PEFT names the adapter "default" in the model, not in the adapter file
        masters = {k.replace(".default.", "."): v for k, v in masters.items() if "lora_" in k}
    final = load_file(out / "final" / ("adapter_model.safetensors" if adapter else "model.safetensors"))
    assert final and final.keys() == masters.keys()
    assert {t.dtype for t in final.values()} == {dtype}
    different = [k for k in final if not torch.equal(final[k], masters[k].to(dtype))]
    assert not different, different
    if dtype == torch.float32:  # the check can see a bf16 export: the masters are not bf16 values
        assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())


class SayAt(LogitsProcessor):
    """Greedy generation steered: no eos id ever, but new token ``at`` is ``token``."""

    def __init__(self, start: int, at: int, token: int, banned: list[int]):
        self.start, self.at, self.token, self.banned = start, at, token, banned

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.banned] = -torch.inf
        if input_ids.shape[1] - self.start == self.at:
            scores[:] = -torch.inf
            scores[:, self.token] = 0.0
        return scores


def new_tokens(model, tokenizer, at: int = 3, max_new_tokens: int = 12) -> list[int]:
    from transformers import LogitsProcessorList

    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([SayAt(ids.shape[1], at, EOT, [BASE_EOS, EOT])]))
    return out[0, ids.shape[1]:].tolist()


def assert_stops_at_the_end_of_turn(model, tokenizer, final: Path) -> None:
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(final).eos_token_id == [BASE_EOS, EOT]
    assert tokenizer.eos_token_id == EOT
    model.generation_config = GenerationConfig.from_pretrained(final)
    said = new_tokens(model, tokenizer)
    assert len(said) == 4 and said[-1] == EOT, said  # stopped at the end of the turn
    model.generation_config.eos_token_id = BASE_EOS  # negative control: the base's eos only
    assert len(new_tokens(model, tokenizer)) == 12


def test_ddp_bf16_full_export_is_the_masters_and_stops_at_the_end_of_turn(tmp_path):
    """One process (ddp; bf16 autocast over fp32 weights); config.json carries the end of turn too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_tiny(tmp_path, *BF16)
    assert_final_is_the_masters(tmp_path, torch.float32)
    final = tmp_path / "final"
    assert json.loads((final / "config.json").read_text())["eos_token_id"] == [BASE_EOS, EOT]
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.generation_config.eos_token_id == [BASE_EOS, EOT]  # what generate() and pipelines read
    assert_stops_at_the_end_of_turn(model, AutoTokenizer.from_pretrained(final), final)


@pytest.mark.multiproc
@pytest.mark.parametrize("strategy,extra", [
    ("zero2", ["model=tiny_base", "peft=lora", "optim.lr=1e-2"]),  # the adapter, from ZeRO-2's fp32 partitions
    ("zero3", ["model.dtype=float32"]),  # every weight gathered from ZeRO-3's fp32 shards
    ("fsdp", ["model.dtype=bfloat16"]),  # the masters cast to the storage dtype
    # the adapters of a ZeRO-3 bf16 run: made after the base's bf16 shards, cast to bf16 with fp32 masters (they
    # were fp32 and met bf16 inputs: 'expected m1 and m2 to have the same dtype')
    ("zero3", ["model=tiny_base", "peft=lora", "optim.lr=1e-2"]),
], ids=["zero2-lora", "zero3", "fsdp-bf16", "zero3-lora"])
def test_two_process_bf16_export_is_the_masters(tmp_path, strategy, extra):
    """2 processes. ZeRO-2 with LoRA: only the adapters have masters (the frozen base is skipped on every rank, so
    the collectives match); the adapter directory carries the end of turn in its generation config."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from distsft.model.load import load_model
    from tests.conftest import typed_cfg

    launch(2, tmp_path, f"parallel={strategy}", *BF16, *extra)
    lora = "peft=lora" in extra
    dtype = torch.bfloat16 if "model.dtype=bfloat16" in extra else torch.float32
    assert_final_is_the_masters(tmp_path, dtype, adapter=lora)
    if lora:
        final = tmp_path / "final"
        model = PeftModel.from_pretrained(load_model(typed_cfg("model=tiny_base").model, seed=42), final).eval()
        assert_stops_at_the_end_of_turn(model, AutoTokenizer.from_pretrained(final), final)


MERGE = ["model=tiny_base", "optim.lr=1e-2", "trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=0",
         "logging.sample_every=0", "logging.plot=false", "export.mode=merged", "data.chat_template=llama3"]


@pytest.mark.parametrize("extra", [
    ["peft=lora"],  # the control: an fp32 merge is lossless up to float rounding
    ["peft=lora", "model.dtype=bfloat16", "trainer.precision=bf16"],  # W+ΔW rounded to bf16 once
    ["peft=qlora"],  # the adapter learned against NF4 weights, merged into the un-quantised base
], ids=["lora-fp32", "lora-bf16", "qlora"])
def test_merged_export_is_scored_again(tmp_path, extra, caplog, monkeypatch):
    """summary.json's export_check: final/'s eval loss (reloaded as a plain model) next to the trained model's at
    the same step. The fp32 merge must match it to float rounding (same batches, same loss); the others differ.
    QLoRA's run is held to a zero tolerance: its warning names the cause."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distsft import export_check

    qlora = "peft=qlora" in extra
    if qlora:
        monkeypatch.setattr(export_check, "TOLERANCE", 0.0)
    with caplog.at_level(logging.INFO, logger="distsft"):
        run_tiny(tmp_path, *MERGE, *extra)
    summary = json.loads((tmp_path / "summary.json").read_text())
    check = summary["export_check"]
    assert check["trained_eval_loss"] == summary["final_eval_loss"]
    assert check["gap"] == pytest.approx(check["final_eval_loss"] - check["trained_eval_loss"], abs=1e-12)
    assert check["within_tolerance"] == (abs(check["relative_gap"]) <= check["tolerance"])
    assert "export check: final/ eval loss" in caplog.text
    if extra == ["peft=lora"]:
        assert abs(check["relative_gap"]) < 1e-6 and check["within_tolerance"]
    else:
        assert 1e-6 < abs(check["relative_gap"]) < 0.05, check
    if qlora:
        assert not check["within_tolerance"] and "QLoRA dequantisation" in caplog.text
    final = tmp_path / "final"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    if extra == ["peft=lora"]:
        assert_stops_at_the_end_of_turn(model, AutoTokenizer.from_pretrained(final), final)
