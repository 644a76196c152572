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
                 provenance: dict | None = None) -> Path:
    """``base_loader()`` rebuilds the un-quantised base model (merged mode)."""
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
            inner.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        OmegaConf.save(OmegaConf.create(resolved), tmp / "distsft_config.yaml")
        if provenance is not None:
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def _merge(tmp: Path, base_loader) -> None:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_loader(), tmp / "adapter").merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    if merged.generation_config is not None:
        merged.generation_config.save_pretrained(tmp)
    shutil.rmtree(tmp / "adapter")
