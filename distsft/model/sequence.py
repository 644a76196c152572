"""Model pipeline (sequence parallelism): DeepSpeed's Ulysses attention in front of the model's own.

With ``parallel.sp_size=S`` each rank of a group of S holds a contiguous slice of every packed row
(data.collate.sequence_shard). Everything but attention is per token and runs on the slice. Around each
attention call DeepSpeed's ``UlyssesSPAttentionHF`` (registered by Accelerate at ``prepare``) exchanges
q/k/v all-to-all: each rank then holds the whole rows for H/S of the heads, and gathers the rows'
``position_ids``; the attention function sees whole documents; a second all-to-all gives every rank its
slice back with all heads::

    rank r:  q,k,v [B, H, T/S, D]  --all-to-all-->  [B, H/S, T, D]  --attention-->  --all-to-all-->  [B, T/S, H*D]

Under ``parallel=zero1|2|3`` Accelerate registers the wrapper at ``prepare`` with DeepSpeed's own sequence-parallel
groups (``hand_to_accelerate``); under ``parallel=fsdp`` (with tensor parallelism or without) distsft registers the
same DeepSpeed module itself, on the ``sp`` dimension of FSDP2's device mesh, for the heads a tensor-parallel rank
holds (``around_attention``).

DeepSpeed passes the attention function no mask, so the function must find document boundaries itself:
``varlen`` reads the whole rows' ``cu_seqlens`` (the batch keeps them), ``flash_attention_2`` derives them
from the gathered position_ids, and ``sdpa`` becomes ``sdpa_packed`` (model.attention), which builds the
block-diagonal mask from them. ``eager`` needs a 4D mask and is refused.
"""

from __future__ import annotations

from ..config import ConfigError


def attention(impl: str) -> str:
    """The attention implementation to load under sequence parallelism for the resolved ``impl`` (eager is
    refused at compose time: checks.check_sequence_parallel)."""
    return "sdpa_packed" if impl == "sdpa" else impl


def held_heads(config, tp_size: int = 1) -> tuple[int, int]:
    """(query heads, key/value heads) a rank holds: all of them, or its 1/tp under tensor parallelism."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return heads // tp_size, max(kv // tp_size, 1)


def check_heads(config, sp_size: int, tp_size: int = 1) -> None:
    """Ulysses gives every rank H/S query heads: S must divide them (and the key/value heads, or be a multiple); under
    tensor parallelism, the H/tp heads a rank holds."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, kv = held_heads(config, tp_size)
    held = f" (of the {heads} and {kv} a tensor-parallel rank holds)" if tp_size > 1 else ""
    if heads % sp_size or (kv % sp_size and sp_size % kv):
        raise ConfigError(f"parallel.sp_size={sp_size} must divide the model's {heads} attention heads and divide "
                          f"or be a multiple of its {kv} key/value heads{held} (Ulysses splits heads across the "
                          "group)")
    if getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None):
        raise ConfigError("parallel.sp_size > 1 with a mixture-of-experts model is not supported yet: the router's "
                          "load-balancing term is a per-row statistic, and each rank holds part of every row")


def hand_to_accelerate(accelerator, model, sp_size: int) -> None:
    """Tell Accelerate which attention function DeepSpeed's all-to-all wraps (the model's, as loaded)."""
    check_heads(model.config, sp_size)
    handler = accelerator.parallelism_config.sp_handler
    handler.sp_attn_implementation = model.config._attn_implementation


def around_attention(accelerator, model, sp_size: int, tp_size: int, micro_batch: int) -> None:
    """Under FSDP2: DeepSpeed's Ulysses module around the model's attention function (what its
    ``register_with_transformers`` does with DeepSpeed's groups), on the device mesh's ``sp`` group, for the heads a
    tensor-parallel rank holds. Every call of that attention implementation then goes through the all-to-all."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..compat import checked

    check_heads(model.config, sp_size, tp_size)
    checked("model.sequence")
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # DeepSpeed's comm over the existing process group
    text = model.config.get_text_config()
    impl = model.config._attn_implementation
    heads, kv = held_heads(model.config, tp_size)
    ulysses = UlyssesSPAttentionHF(
        attn=ALL_ATTENTION_FUNCTIONS[impl], batch_size=micro_batch, attn_head_count=heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        kv_head_count=kv, num_hidden_layers=text.num_hidden_layers,
        process_group=accelerator.torch_device_mesh["sp"].get_group(), seq_length_is_variable=True)
    ulysses.core_attn_implementation = impl

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        # position_ids carry the documents; a mask made for the local slice would be wrong after the all-to-all
        return ulysses(module, query, key, value, None, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[impl] = attention
