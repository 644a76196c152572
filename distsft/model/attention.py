"""Model stage 2 (attention): which kernel keeps packed documents apart, said out loud.

Packed rows are run with restarting ``position_ids``, no ``attention_mask`` and ``use_cache=False``.
transformers then isolates documents by itself:
  - flash_attention_2 (flash-attn installed, CUDA): varlen kernels, cu_seqlens from position_ids;
  - sdpa / eager: a block-diagonal causal mask built from position_ids (any device, CPU included).
"""

from __future__ import annotations

from ..config import ModelConfig


def describe_attention(cfg: ModelConfig, mode: str) -> str:
    impl = cfg.attn_implementation
    if mode != "pack":
        return f"{impl}, padded rows with an attention mask"
    if impl == "flash_attention_2":
        return "flash_attention_2 varlen kernels over packed documents (cu_seqlens from position_ids)"
    return f"{impl} with a block-diagonal causal mask built from packed position_ids"
