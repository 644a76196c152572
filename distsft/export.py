"""Export stage: the trained model as a Hugging Face directory (safetensors, config, tokenizer,
generation config, resolved training config).

Written to ``final.tmp`` and renamed to ``final`` only when complete, so a crash mid-export
never leaves a ``final/`` that looks loadable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf


def export_final(accelerator, model, tokenizer, out_dir: Path, resolved: dict) -> Path:
    final, tmp = out_dir / "final", out_dir / "final.tmp"
    # get_state_dict gathers sharded weights; every rank must take part
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        inner = accelerator.unwrap_model(model)
        inner.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if inner.generation_config is not None:
            inner.generation_config.save_pretrained(tmp)
        OmegaConf.save(OmegaConf.create(resolved), tmp / "distsft_config.yaml")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final
