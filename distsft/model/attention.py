"""Model pipeline (attention): which kernel keeps packed documents apart, chosen and said out loud.

Packed rows are run with restarting ``position_ids``, no ``attention_mask`` and ``use_cache=False``.

    sdpa / eager        transformers builds a block-diagonal causal mask from position_ids
                        (any device; the memory of a [B, 1, T, T] mask)
    flash_attention_2   flash-attn's varlen kernels (CUDA, flash-attn installed); transformers
                        derives cu_seqlens from position_ids
    varlen              distsft's own: the batch is flattened to [B*T] and attention runs per
                        document from the collator's ``cu_seqlens``; on CUDA PyTorch's flash kernel
                        ``torch.nn.attention.varlen.varlen_attn``, on CPU a reference loop of
                        causal SDPA per document (slow; for checking, not for speed)
    auto                flash_attention_2 if flash-attn imports on CUDA; else varlen for packed bf16
                        training on CUDA; else sdpa

Under sequence parallelism (model.sequence) DeepSpeed's all-to-all runs in front of the attention
function and passes it no mask, so ``sdpa`` becomes ``sdpa_packed``: SDPA with the block-diagonal causal
mask built inside the attention call from the (gathered, whole-row) ``position_ids``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

VARLEN = "distsft_varlen"
PACKED_SDPA = "distsft_sdpa_packed"


def auto_attention(cuda: bool, packed: bool, half: bool) -> str:
    """What ``auto`` means for a training run: flash-attn where installed on CUDA; else, for packed rows
    in bf16 on CUDA, PyTorch's own flash varlen kernel (torch >= 2.10); else sdpa."""
    if cuda and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    if cuda and packed and half and importlib.util.find_spec("torch.nn.attention.varlen"):
        return "varlen"
    return "sdpa"


def configured_attention(cfg, cuda: bool) -> str:
    """model.attn_implementation of a training config, ``auto`` decided where packing and precision are known
    (model.build on its device; distsft.plan as on CUDA)."""
    from .precision import half_compute

    impl = cfg.model.attn_implementation
    return auto_attention(cuda, cfg.data.mode == "pack", half_compute(cfg)) if impl == "auto" else impl


def resolve_attention(impl: str, cuda: bool) -> str:
    """The attn_implementation given to transformers."""
    if impl == "auto":
        impl = auto_attention(cuda, packed=False, half=False)
    if impl == "varlen":
        register_varlen()
        return VARLEN
    if impl == "sdpa_packed":
        register_packed_sdpa()
        return PACKED_SDPA
    return impl


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention interface: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> [B, T, Hq, D], causal
    inside each document of ``position_ids`` [B, T] (a document starts where its position is 0)."""
    pos = kwargs.get("position_ids")
    t = query.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
    if pos is None or pos.shape[-1] != t:
        raise RuntimeError(f"attn_implementation=sdpa_packed needs the position_ids of the whole row (got "
                           f"{None if pos is None else tuple(pos.shape)} for {t} positions)")
    doc = (pos == 0).cumsum(-1)  # [B, T]: document number of every position
    mask = (doc[:, :, None] == doc[:, None, :]) & causal  # [B, T, T]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, flash_attention_mask)  # the mask is built in the call


def _reference_varlen(q, k, v, cu: torch.Tensor, scale: float | None) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]: causal attention inside each [cu[i], cu[i+1])."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        # [1, H, n, D]: with a batch dimension CPU SDPA runs its flash kernel (memory linear in n); 3-D inputs
        # fall back to the math kernel, which materialises [H, n, n] scores and probabilities for backward
        qi, ki, vi = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
        out[s:e] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                                  enable_gqa=ki.shape[1] != qi.shape[1])[0].transpose(0, 1)
    return out


@functools.cache
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _cuda_varlen(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    """PyTorch's flash varlen kernel, causal, across the torch versions that have it: 2.10 takes
    ``is_causal``, later ones a ``window_size``; grouped-query heads are expanded where ``enable_gqa``
    is missing."""
    from torch.nn.attention.varlen import varlen_attn

    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # fp32 weights under bf16 autocast: RoPE gave fp32 q/k
        if not torch.is_autocast_enabled("cuda"):
            raise RuntimeError("attn_implementation=varlen on CUDA runs flash kernels, which need bf16 or fp16: "
                               "set trainer.precision=bf16 or model.dtype=bfloat16")
        half = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(half), k.to(half), v.to(half)
    params = _varlen_params()
    extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **extra).to(dtype)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention interface: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> [B, T, Hq, D]."""
    b, hq, t, d = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # unpacked rows: each row is one document
        if attention_mask is not None:
            raise RuntimeError("attn_implementation=varlen takes packed rows (data.mode=pack), not padded ones")
        cu = torch.arange(b + 1, dtype=torch.int32, device=query.device) * t
        kwargs["max_length_q"] = t
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))  # [B*T, H, D]
    if q.is_cuda:
        n = int(kwargs["max_length_q"])
        out = _cuda_varlen(q, k, v, cu, n, scaling)
    else:
        out = _reference_varlen(q, k, v, cu, scaling)
    return out.reshape(b, t, hq, d), None


def register_varlen() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    # like flash attention: no 4D mask is built (None for packed rows without padding)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)


def describe_attention(impl: str, mode: str) -> str:
    if mode != "pack":
        return f"{impl}, padded rows with an attention mask"
    if impl == "flash_attention_2":
        return "flash_attention_2 varlen kernels over packed documents (cu_seqlens from position_ids)"
    if impl == VARLEN:
        return "varlen per document from cu_seqlens (torch varlen_attn on CUDA, reference SDPA loop on CPU)"
    if impl == PACKED_SDPA:
        return "sdpa with a block-diagonal causal mask from the whole row's position_ids (sequence parallel)"
    return f"{impl} with a block-diagonal causal mask built from packed position_ids"
