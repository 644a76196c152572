"""Trainer: sample generations — a few prompts answered every N steps, written to every tracker
(TensorBoard as text; the main process writes; every rank generates, because under ZeRO-3 the forward
passes gather parameters collectively). The prompts are logging.sample_prompts, or when that is empty the
first user turns of the user's own data (data.prompts: eval files first, else training files)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from accelerate.utils import DistributedType

from ..config import DataConfig, LoggingConfig
from ..data.prompts import LONGEST, data_prompts
from ..model.attention import VARLEN
from ..model.load import base_model

log = logging.getLogger("distsft")


def with_sample_prompts(cfg: LoggingConfig, data: DataConfig) -> LoggingConfig:
    """``cfg`` with its sample prompts: its own, or (logging.sample_prompts empty) taken from the data."""
    if not cfg.sample_every or cfg.sample_prompts:
        return cfg
    found = data_prompts(data, cfg.sample_count)
    if not found:
        log.warning("samples: off (logging.sample_every=%d): no user turn of at most %d characters in the top "
                    "rows of the data files; set logging.sample_prompts", cfg.sample_every, LONGEST)
        return replace(cfg, sample_every=0)
    log.info("samples: %d prompts from the data (logging.sample_prompts is empty): %s", len(found),
             "; ".join(where for _, where in found))
    return replace(cfg, sample_prompts=[p for p, _ in found])


@torch.no_grad()
def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int, device=None, **generate_kwargs) -> str:
    """The model's greedy answer to one user prompt under the tokenizer's chat template (as decoded)."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    enc = enc.to(device) if device is not None else enc
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, accelerator) -> list[tuple[str, str]]:
    inner = accelerator.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    # ZeRO-3 and FSDP2 gather parameters collectively in every forward: a rank whose reply ends first must keep
    # stepping with the others until every rank's has ended (synced_gpus), or the longer ones hang in a gather
    plugin = accelerator.state.deepspeed_plugin
    synced = accelerator.num_processes > 1 and (plugin is not None and plugin.zero_stage == 3
                                                or accelerator.distributed_type == DistributedType.FSDP)
    # distsft's varlen kernel has no KV-cache path: recompute instead (a few tokens only)
    use_cache = base_model(inner).config._attn_implementation != VARLEN
    out = []
    for prompt in prompts:
        # compiled layers (model.compile) would recompile for every cache length and layer index: eager here
        with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            out.append((prompt, greedy_reply(inner, tokenizer, prompt, max_new_tokens, accelerator.device,
                                             use_cache=use_cache, synced_gpus=synced)))
    inner.train(was_training)
    return out


def as_markdown(samples: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"**prompt:** {p}  \n**output:** {o}" for p, o in samples)


def loop_logging(cfg):
    """The logging settings the loop runs with: the sample prompts resolved (logging.sample_prompts, else from the
    data), and no samples under sequence parallelism (generation would run a slice of a row as a whole row)."""
    from dataclasses import replace

    if cfg.parallel.sequence_parallel and cfg.logging.sample_every:
        log.info("samples: off under sequence parallelism (logging.sample_every=%d ignored)", cfg.logging.sample_every)
        return replace(cfg.logging, sample_every=0)
    return with_sample_prompts(cfg.logging, cfg.data)
