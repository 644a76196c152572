"""Export stage: the trained model as a Hugging Face directory in ``output_dir/final``.

    full     the whole model (safetensors, config, tokenizer, generation config)
    adapter  the LoRA/DoRA adapter only (adapter_config.json + adapter_model.safetensors), for
             PeftModel.from_pretrained(base, final); the tokenizer comes along
    merged   the adapter folded into a fresh, un-quantised copy of the base, saved as a plain model
             in the training dtype (loads without peft or bitsandbytes)
    auto     full for full fine-tuning, adapter under PEFT

Weights are gathered first (ZeRO-3 shards them), on every rank. Everything is written to
``final.tmp`` and renamed to ``final`` only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf


def export_final(accelerator, model, tokenizer, out_dir: Path, resolved: dict, mode: str, base_loader,
                 provenance: dict | None = None, dtype: str | None = None) -> Path:
    """``base_loader()`` rebuilds the un-quantised base model (merged mode). ``dtype``: the storage dtype
    of a full model (model.dtype; training kept fp32 master weights, the checkpoints keep them too)."""
    final, tmp = out_dir / "final", out_dir / "final.tmp"
    state_dict = accelerator.get_state_dict(model)  # gathers sharded weights; every rank takes part
    inner = accelerator.unwrap_model(model)
    peft = hasattr(inner, "peft_config")
    mode = ("adapter" if peft else "full") if mode == "auto" else mode
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        if peft:
            from peft import get_peft_model_state_dict

            inner.save_pretrained(tmp / "adapter" if mode == "merged" else tmp,
                                  state_dict=get_peft_model_state_dict(inner, state_dict=state_dict))
            if mode == "merged":
                _merge(tmp, base_loader)
        else:
            inner.save_pretrained(tmp, state_dict=_in_dtype(state_dict, dtype), safe_serialization=True)
            if dtype:
                _set_config_dtype(tmp / "config.json", dtype)
        tokenizer.save_pretrained(tmp)
        OmegaConf.save(OmegaConf.create(resolved), tmp / "distsft_config.yaml")
        if provenance is not None:
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def _in_dtype(state_dict: dict, dtype: str | None) -> dict:
    import torch

    if not dtype:
        return state_dict
    target = getattr(torch, dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()}


def _set_config_dtype(path: Path, dtype: str) -> None:
    """config.json names the dtype the weights are stored in (from_pretrained's dtype="auto" reads it)."""
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _merge(tmp: Path, base_loader) -> None:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_loader(), tmp / "adapter").merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    if merged.generation_config is not None:
        merged.generation_config.save_pretrained(tmp)
    shutil.rmtree(tmp / "adapter")
