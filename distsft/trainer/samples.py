"""Trainer stage 10: sample generations — a few fixed prompts answered every N steps, written to
TensorBoard as text (the main process writes; every rank generates, because under ZeRO-3 the
forward passes gather parameters collectively)."""

from __future__ import annotations

import torch

from ..model.attention import VARLEN


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, accelerator) -> list[tuple[str, str]]:
    inner = accelerator.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    # distsft's varlen kernel has no KV-cache path: recompute instead (a few tokens only)
    use_cache = base.config._attn_implementation != VARLEN
    out = []
    for prompt in prompts:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True).to(accelerator.device)
        # compiled layers (model.compile) would recompile for every cache length and layer index: eager here
        with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            gen = inner.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                                 synced_gpus=zero3, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        out.append((prompt, tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)))
    inner.train(was_training)
    return out


def as_markdown(samples: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"**prompt:** {p}  \n**output:** {o}" for p, o in samples)
