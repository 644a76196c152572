"""LoRA / DoRA / QLoRA, 8-bit and Adafactor optimizers, gradient checkpointing, adapter and merged export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distsft.model.load import load_model
from tests.conftest import run_tiny, typed_cfg

STEPS = ["trainer.max_steps=6", "trainer.eval_every=0", "trainer.save_every=3", "logging.log_every=1"]
IDS = torch.randint(5, 600, (2, 24), generator=torch.Generator().manual_seed(0))


def base_model():
    return load_model(typed_cfg().model, seed=42).eval()  # the run's random base (trainer.seed=42)


def losses(res):
    return [x for _, x in res.summary["train_loss_history"]]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_trains_adapters_only_and_exports(tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = run_tiny(tmp_path / "a", f"peft={method}", "optim.lr=1e-2", *STEPS)
    assert losses(res)[-1] < losses(res)[0]
    trained = res.model.eval()
    fresh = base_model().state_dict()
    base_sd = trained.get_base_model().state_dict()
    for k, v in fresh.items():  # base weights bit-identical after training
        key = k if k in base_sd else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(base_sd[key], v), k
    assert any(("lora_" in n) and p.requires_grad for n, p in trained.named_parameters())
    assert all(("lora_" in n) for n, p in trained.named_parameters() if p.requires_grad)

    final = tmp_path / "a" / "final"  # export.mode=auto under PEFT: the adapter
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    with torch.no_grad():
        want = trained(IDS).logits
        adapter = PeftModel.from_pretrained(base_model(), final).eval()
        torch.testing.assert_close(adapter(IDS).logits, want, rtol=1e-5, atol=1e-5)

    run_tiny(tmp_path / "m", f"peft={method}", "optim.lr=1e-2", *STEPS, "export.mode=merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "final").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, want, rtol=1e-4, atol=1e-4)


def test_qlora_on_cpu_trains_and_merges_without_bitsandbytes(tmp_path):
    from transformers import AutoModelForCausalLM

    res = run_tiny(tmp_path, "peft=qlora", "optim.lr=1e-2", *STEPS, "export.mode=merged")
    assert losses(res)[-1] < losses(res)[0]
    assert any(type(m).__name__ == "Linear4bit" for m in res.model.modules())
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not any("bitsandbytes" in type(m).__module__ for m in merged.modules())
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "final" / "model.safetensors").values())


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit", "adafactor"])
def test_optimizers_learn_and_resume_exactly(tmp_path, optim):
    straight = run_tiny(tmp_path / "a", f"optim={optim}", "optim.lr=3e-3", *STEPS)
    assert losses(straight)[-1] < losses(straight)[0]
    run_tiny(tmp_path / "b", f"optim={optim}", "optim.lr=3e-3", *STEPS, "trainer.stop_after=3")
    run_tiny(tmp_path / "b", f"optim={optim}", "optim.lr=3e-3", *STEPS)
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), optim


def test_gradient_checkpointing_same_loss_and_gradients(tokenizer):
    from accelerate import Accelerator

    from distsft.batch import BatchPlan
    from distsft.data.loader import StepLoader, pack
    from distsft.data.prepare import prepare
    from distsft.model.peft import apply_peft
    from distsft.trainer.step import accumulate_gradients
    from tests.conftest import reset_accelerate

    cfg = typed_cfg("data.val_fraction=0")
    prep = prepare(cfg.data, tokenizer)
    step = next(StepLoader(prep.train, pack(prep.train, cfg.data, prep.train_stats), BatchPlan(4, 2, 1, 8), 0,
                           cfg.data, 0).steps(0))
    out = {}
    for gc, every in ((False, 1), (True, 1), (True, 2)):
        reset_accelerate()
        model = apply_peft(load_model(cfg.model, seed=0), cfg.peft, gradient_checkpointing=gc,
                           checkpoint_every=every).train()
        assert model.is_gradient_checkpointing == gc
        recomputed = [m.gradient_checkpointing for m in model.model.layers]
        assert recomputed == ([False, False] if not gc else [True, True] if every == 1 else [True, False])
        loss, _, _ = accumulate_gradients(model, step, Accelerator(cpu=True, gradient_accumulation_steps=2))
        out[gc, every] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    reset_accelerate()
    base = out[False, 1]
    for key in ((True, 1), (True, 2)):
        assert out[key][0] == pytest.approx(base[0], rel=1e-5)
        assert ((out[key][1] - base[1]).norm() / base[1].norm()).item() <= 1e-5


@pytest.mark.parametrize("overrides,message", [
    (["peft.quantize=nf4"], "peft.quantize=nf4 freezes the base"),
    (["export.mode=adapter"], "export.mode=adapter needs adapters"),
    (["peft=lora", "export.mode=full"], "export.mode=full under PEFT"),
    (["peft=qlora", "parallel=fsdp"], "peft.quantize with parallel=fsdp"),
    (["peft=qlora", "parallel=zero3_offload"], "DeepSpeed cannot offload bitsandbytes weights"),
    (["optim=paged_adamw_8bit", "parallel=zero3_offload"], "DeepSpeed keeps the offloaded optimizer state"),
    (["optim=adamw_8bit", "parallel=zero2", "parallel.offload_optimizer=true"], "use optim=adamw"),
    (["optim=adafactor", "parallel=zero2"], "adafactor under DeepSpeed ZeRO"),
])
def test_refused_combinations(overrides, message):
    from distsft.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        typed_cfg(*overrides)


def test_qlora_zero3_refused_on_cpu():
    from distsft.checks import check_device_combinations
    from distsft.config import ConfigError

    with pytest.raises(ConfigError, match="nf4 with ZeRO-3 needs CUDA"):
        check_device_combinations(typed_cfg("peft=qlora", "parallel=zero3"), cuda=False)
    check_device_combinations(typed_cfg("peft=qlora", "parallel=zero3"), cuda=True)


@pytest.mark.parametrize("extra", [[], ["model.fp8=true"]], ids=["plain", "fp8"])
def test_lora_with_dropout_resumes_exactly(tmp_path, extra):
    """Dropout draws from the RNG: a resumed run must draw the same masks as an uninterrupted one (also with the
    base's matmuls in FP8: its scales are computed afresh every call, nothing to carry)."""
    args = ["peft=lora", "peft.dropout=0.1", "optim.lr=1e-2", *STEPS, *extra]
    run_tiny(tmp_path / "a", *args)
    run_tiny(tmp_path / "b", *args, "trainer.stop_after=3")
    run_tiny(tmp_path / "b", *args)
    a = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_without_input_casts_under_autocast_is_the_same_function():
    """adapters_under_autocast drops PEFT's fp32 copy of each LoRA input: under bf16 autocast the adapter
    matmuls see the same bf16 values either way, so logits and adapter gradients are identical."""
    from distsft.model.peft import adapters_under_autocast, apply_peft

    x = torch.randint(3, 640, (2, 48))
    out = []
    for drop_cast in (False, True):
        model = apply_peft(load_model(typed_cfg().model, seed=0), typed_cfg("peft=lora", "peft.dropout=0.0").peft,
                           False)
        torch.manual_seed(1)  # LoRA B starts at zero: give it values so the adapters change the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.05)
        if drop_cast:
            assert adapters_under_autocast(model) == 2 * 7  # 2 layers x 7 linear modules
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x, use_cache=False).logits
        logits.float().sum().backward()
        grad = next(p.grad for n, p in model.named_parameters() if "lora_A" in n)
        out.append((logits.detach(), grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
